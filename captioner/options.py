"""Decoding options: the one place where each option's default and limits live. The
library, the CLI, the server and the trainer's validation all build a `DecodeOptions`,
so they accept the same values and reject the same mistakes. The encoder backends'
names and default live here too (backends.py runs them).

Kept free of torch so that `captioner --help` can read the limits without loading it.
"""
import dataclasses
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

def available_cores():
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a
    container started with --cpus 2 on a 64-core host has 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, round(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


# Server worker processes when none are asked for: one per core up to 4. Each holds the
# model (~0.5 GB) and cores / workers threads; on 2 cores, 2 workers serve 34 images/s and
# 1 worker 23 (benchmarks/serve.py).
def default_server_workers():
    return min(4, available_cores())


# How the encoder runs (backends.py): "auto" picks the fastest backend that captions as
# well as torch fp32 on this machine.
BACKENDS = ("auto", "torch", "torch-bf16", "onnx", "onnx-int8")
DEFAULT_BACKEND = "auto"


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 3  # 1 is greedy decoding (when no concept is forced)
    n_best: int = 1  # candidates returned per image, best first (<= beam_size)
    max_length: int = 20  # words per caption
    length_alpha: float = 0.7  # candidates are ranked by log-prob / length**alpha; chosen on Flickr8k dev
    grounding: bool = True  # make the caption name the objects the encoder's classifier is sure of
    # A concept (e.g. "cat": the sum of the ImageNet classes that map to it) is reported as
    # an object at this probability, and forced into the caption when grounding is on.
    # Chosen on the dev sets (coco-dev, imagenet-sample, Flickr8k dev): see the model card.
    concept_threshold: float = 0.3
    max_concepts: int = 1  # at most this many objects are forced into one caption (the surest first)

    # (lowest, highest) of each numeric option. The server, CLI and library enforce these.
    LIMITS: ClassVar[dict] = {
        "beam_size": (1, 10),
        "n_best": (1, 5),
        "max_length": (1, 50),
        "length_alpha": (0.0, 2.0),
        "concept_threshold": (0.05, 1.0),
        "max_concepts": (0, 2),
    }

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


# Dataset layouts `captioner train` and `evaluate` read (data.read_dataset).
DATA_FORMATS = ("auto", "flickr8k", "karpathy", "coco", "csv", "jsonl", "folder")


def setting(default, help=None, *, limits=None, open_limits=(False, False), choices=None, path=None,
            changeable=False, flag=None):
    """A TrainConfig field: its default and the rules the CLI, the trainer and --resume read.
    `limits` (low, high; None for no bound, `open_limits` excludes an end), `choices`, `path`
    ("file", "dir" or "any": must exist), `changeable`: may differ when a run is resumed,
    `flag`: the click flag declaration where it is not the plain --name."""
    meta = {"help": help, "limits": limits, "open_limits": open_limits, "choices": choices, "path": path,
            "changeable": changeable, "flag": flag}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of `captioner train`, its default and limits, in one place. The CLI's
    flags are generated from these fields (cli.train_flags); a run stores its config in
    train_state.pt and in every checkpoint, and --resume refuses to change a setting that is
    not `changeable`."""
    data: str = setting(None, "Dataset: a Flickr8k folder, Karpathy or COCO json, CSV/JSONL (image,caption), "
                              "or a folder of images with .txt captions.", path="any")
    out: str = setting(None, "Run folder.", changeable=True)  # a run folder may be moved
    format: str = setting("auto", choices=DATA_FORMATS)
    images: str = setting(None, "Image folder, where the layout does not fix it (default: beside the data file).",
                          path="dir")
    epochs: int = setting(30, limits=(1, None), changeable=True)
    batch_size: int = setting(64, "Captions per step in each process (under torchrun the global batch is this "
                                  "times the number of processes).", limits=(1, None))
    lr: float = setting(4e-4, limits=(0, None), open_limits=(True, False))
    lr_decay_epochs: int = setting(None, "Cosine-decay the learning rate to 5% over this many epochs, then keep it "
                                         "there (default: --epochs). Fix it to extend a run later with --resume "
                                         "--epochs N.", limits=(1, None))
    encoder_lr: float = setting(1e-5, "Learning rate of the encoder with --fine-tune-encoder.", limits=(0, None))
    embed_dim: int = setting(512, limits=(1, None))
    hidden_dim: int = setting(512, limits=(1, None))
    num_layers: int = setting(1, limits=(1, 8))
    cell: str = setting("lstm", choices=("lstm", "gru", "rnn"))
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
    val_fraction: float = setting(0.1, "Share of images held out for validation when the data has no split.",
                                  limits=(0, 1), open_limits=(False, True))
    split_file: str = setting(None, "Splits by image file name: a Karpathy json (dataset_coco.json) or a list of "
                                    "validation images.", path="file")
    seed: int = setting(0)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (under torchrun each process takes cuda:LOCAL_RANK).",
                          changeable=True)
    workers: int = setting(None, "Image-decoding worker processes.", limits=(0, 64), changeable=True)
    amp: bool = setting(True, "Mixed precision on CUDA.", flag="--amp/--no-amp", changeable=True)
    fine_tune_encoder: bool = setting(False, "Train the CNN too (slow on a CPU).", flag="--fine-tune-encoder")
    init_from: str = setting(None, "Start from a trained model ('default' for the shipped one): its architecture "
                                   "and vocabulary, extended with the new data's words.")
    cache_dir: str = setting(None, "Where image features are stored (default: ~/.cache/captioner or "
                                   "$CAPTIONER_CACHE).", changeable=True)
    backend: str = setting(DEFAULT_BACKEND, "How the encoder computes the stored features.", choices=BACKENDS)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if f.name in ("data", "out") and not value:
                raise ValueError(f"--{f.name} is required")
            if value is None or f.name == "decode":
                continue
            if isinstance(value, Path):  # paths are kept as text, so that the config is JSON
                object.__setattr__(self, f.name, str(value))
            if f.name == "text_data":
                object.__setattr__(self, f.name, tuple(str(p) for p in value))
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"--{_flag(f.name)} must be one of {', '.join(meta['choices'])}, not {value!r}")
            if meta.get("limits"):
                low, high = meta["limits"]
                low_open, high_open = meta["open_limits"]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        (f.type in (int, "int") and value != int(value)):
                    raise ValueError(f"--{_flag(f.name)} must be a number, not {value!r}")
                if (low is not None and (value < low or (low_open and value == low))) or \
                        (high is not None and (value > high or (high_open and value == high))):
                    raise ValueError(f"--{_flag(f.name)} must be in {'(' if low_open else '['}{low}, "
                                     f"{high if high is not None else 'inf'}{')' if high_open else ']'}, not {value}")
        decode = DecodeOptions(**self.decode) if isinstance(self.decode, dict) else self.decode
        # One caption per validation image, as long as the training captions may be.
        object.__setattr__(self, "decode", decode.replace(n_best=1, max_length=self.max_caption_length))

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
            elif old != new:
                changed.append(f"--{_flag(f.name)} was {old!r}, now {new!r}")
        return changed


def _flag(name):
    return name.replace("_", "-")
