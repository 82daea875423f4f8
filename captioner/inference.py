"""The one inference path: the CLI, the server and training's validation all call
`Captioner` (or the decoding functions it wraps)."""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from .backends import load_backend, resolve_backend
from .checkpoint import load_model
from .evidence import banned_words, caption_signals, repeat_rules_for
from .encoder import MAP_SIZE
from .images import image_loader, load_input, preprocess
from .machine import pipeline_threads
from .model import beam_search, greedy_search
from .vocab import START_ID
from .options import DEFAULT_BACKEND, DEFAULT_DEVICE, DecodeOptions


def _default_weights():
    """The shipped model: inside the installed package (a wheel), else weights/ of the source tree."""
    here = Path(__file__).resolve().parent
    packaged = here / "weights" / "model.safetensors"
    return packaged if packaged.is_file() else here.parent / "weights" / "model.safetensors"


DEFAULT_WEIGHTS = _default_weights()
# Images per encoder call, whatever the batch size asked for: the activations of one call
# grow with it, and past this a CPU gains no speed.
MAX_ENCODER_BATCH = 64


def resolve_device(device=DEFAULT_DEVICE):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA GPU(s), "
                         f"numbered from 0")
    return device


def decode_features(model, vocab, features, decode=DecodeOptions(), spatial=None):
    """Pooled image features (B, D) and, for an attention model, their spatial maps
    (B, P, D) -> one result dict per image:
    {"caption", "score", "log_prob", "confidence", "alternatives": [...], "objects": [...]}
    `score` is the length-normalised log-probability that ranks the candidates, `log_prob`
    the caption's total log-probability, `confidence` the estimated probability that the
    caption names nothing absent (None for a model without a calibration, evidence.py),
    `alternatives` the other n-best candidates, and `objects` the concepts the encoder's
    classifier is sure of ({"label", "word", "p"}), which grounding forces into the caption.
    With decode.attention, "attention" too: attention_maps of the caption."""
    if decode.attention and not model.config.attention:
        raise ValueError("attention maps need a model with attention; this one reads the pooled feature only")
    if not model.config.attention:
        spatial = None  # a pooled model never reads it
    class_logits = model.classify_features(features)
    concept_p = model.concepts.concept_probs(class_logits)  # (B, C): for the evidence, whatever the decoder takes
    concepts = concept_p if model.config.num_concepts else None  # the decoder's input (decoder_concepts)
    person_p = model.person_head(features) if model.person_head is not None else None  # (B,)
    objects = model.concepts.detect(class_logits, decode.concept_threshold)
    constraints = [grounding_constraints(model.concepts, vocab, found, decode) for found in objects]
    banned = banned_words(model, vocab, concept_p, person_p, decode)
    repeat_rules = repeat_rules_for(vocab, features.device) if decode.block_repeats else None
    # Images with the same number of forced words decode together: the search keeps
    # 2**M beams per image for M constraints, so plain images stay at the plain cost.
    hyps = [None] * len(features)
    for m in sorted({len(c) for c in constraints}):
        rows = [i for i, c in enumerate(constraints) if len(c) == m]
        index = torch.tensor(rows, device=features.device)
        feats = features.index_select(0, index)
        conc = concepts.index_select(0, index) if concepts is not None else None
        maps = spatial.index_select(0, index) if spatial is not None else None
        if m == 0 and decode.beam_size == 1 and banned is None and repeat_rules is None:
            found = greedy_search(model.decoder, feats, decode.max_length, decode.length_alpha, conc, maps)
        else:
            found = beam_search(model.decoder, feats, decode.beam_size, decode.max_length, decode.n_best,
                                decode.length_alpha, conc, [constraints[i] for i in rows] if m else None,
                                banned.index_select(0, index) if banned is not None else None, repeat_rules,
                                maps)
        for i, h in zip(rows, found, strict=True):
            hyps[i] = h
    maps = attention_maps(model, vocab, features, concepts, spatial, [h[0][0] for h in hyps]) \
        if decode.attention else None
    results = []
    for b, (image_hyps, found) in enumerate(zip(hyps, objects, strict=True)):
        candidates = [{"caption": vocab.decode(ids), "score": round(score, 4), "log_prob": round(lp, 4)}
                      for ids, lp, score in image_hyps]
        confidence = None
        if model.calibration is not None:
            signals = caption_signals(candidates[0]["caption"], candidates[0]["score"], concept_p[b],
                                      person_p[b] if person_p is not None else None, model.concepts)
            confidence = round(float(model.calibration([signals])[0]), 4)
        results.append({**candidates[0], "confidence": confidence, "alternatives": candidates[1:],
                        "objects": [{k: o[k] for k in ("label", "word", "p")} for o in found]})
        if maps is not None:
            results[-1]["attention"] = maps[b]
    return results


def attention_maps(model, vocab, features, concepts, spatial, captions):
    """What the model looked at for each word of `captions` (per image, its word ids): the
    caption is fed back through the decoder (teacher forcing), which gives the attention
    weights the search had on its way to each word. -> per image [{"word", "weights": 7 rows
    of 7}] (the weights of a word sum to 1; row 0 is the top of the photo)."""
    longest = max((len(c) for c in captions), default=0)
    if longest == 0:
        return [[] for _ in captions]
    tokens = torch.zeros(len(captions), longest, dtype=torch.long, device=features.device)  # (B, T) inputs
    tokens[:, 0] = START_ID
    for b, ids in enumerate(captions):
        tokens[b, 1:len(ids)] = torch.tensor(ids[:-1], dtype=torch.long)
    _, weights = model.decoder.unroll(features, tokens, concepts, spatial)  # (B, T, P)
    grids = weights.float().view(len(captions), longest, MAP_SIZE, MAP_SIZE).tolist()  # (B, T, 7, 7)
    return [[{"word": vocab.itos[w], "weights": [[round(x, 4) for x in row] for row in grid]}
             for w, grid in zip(ids, grids[b], strict=False)] for b, ids in enumerate(captions)]


def grounding_constraints(concepts, vocab, found, decode):
    """The word-id sets that grounding forces into one image's caption: the surest
    `max_concepts` detected concepts that have a word in the vocabulary (a concept whose
    words the model never learned is skipped, not forced)."""
    sets = []
    for o in found if decode.grounding else []:
        if len(sets) == decode.max_concepts:
            break
        ids = {vocab.stoi[w] for w in concepts.words[o["concept"]] if w in vocab.stoi}
        if ids:
            sets.append(ids)
    return sets


class Captioner:
    """A loaded captioning model.

    >>> captioner = Captioner.from_pretrained()        # the shipped weights/
    >>> captioner.caption("photo.jpg")["caption"]
    """

    def __init__(self, model, vocab, device="cpu", info=None, backend=DEFAULT_BACKEND, cache_dir=None,
                 threads=None):
        """`backend` runs the encoder (options.BACKENDS; "auto" picks the fastest one that
        captions as well as torch fp32 on this machine); `cache_dir` holds exported ONNX
        files; `threads` caps the encoder's threads (default: the cores this process has)."""
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.info = info or {}
        self.encoder = load_backend(self.model.encoder, backend, self.device, cache_dir, threads)

    @classmethod
    def from_pretrained(cls, path=None, device=DEFAULT_DEVICE, backend=DEFAULT_BACKEND, cache_dir=None, threads=None):
        """Load a checkpoint file (or a folder holding model.safetensors); None means the
        default model shipped in weights/. Raises CheckpointError with a clear message."""
        model, vocab, info = load_model(path or DEFAULT_WEIGHTS)
        return cls(model, vocab, device, info, backend, cache_dir, threads)

    @property
    def name(self):
        return self.info.get("name", "captioner")

    @property
    def backend(self):
        """The encoder backend in use ("auto" resolved)."""
        return self.encoder.name

    @torch.inference_mode()
    def encode_images(self, pixels):
        """(B, 3, 224, 224) preprocessed pixels -> float32 (pooled (B, D), spatial (B, P, D))
        features, encoded MAX_ENCODER_BATCH at a time whatever B is."""
        parts = [self.encoder(pixels[s:s + MAX_ENCODER_BATCH]) for s in range(0, len(pixels), MAX_ENCODER_BATCH)]
        return tuple(torch.cat(p).to(self.device) for p in zip(*parts, strict=True))

    @torch.inference_mode()
    def caption_pixels(self, pixels, options=None, **overrides):
        """Caption a batch of preprocessed images; one result dict each. `options` is a
        DecodeOptions; keyword overrides (beam_size=5, grounding=False, ...) change it."""
        options = decode_options(options, overrides)
        features, spatial = self.encode_images(pixels)
        return decode_features(self.model, self.vocab, features, options, spatial)

    def caption_files(self, paths, options=None, batch_size=32, num_workers=None, **overrides):
        """Caption image files in batches. Yields (index into paths, result dict or None,
        error message or None) for every file, in order: an unreadable file gets its error
        and the rest go on. Worker processes decode the JPEGs of later batches meanwhile."""
        options = decode_options(options, overrides)
        loader = image_loader(paths, batch_size, num_workers)
        batches = (((idx, errors), pixels) for idx, pixels, errors in loader)
        for (idx, errors), results in self.caption_batches(batches, options, count=len(loader)):
            results = dict(zip(idx, results, strict=True)) if results else {}
            for i in sorted(set(idx) | set(errors)):
                yield i, results.get(i), errors.get(i)

    def caption_batches(self, batches, options=None, count=None):
        """Caption an iterable of (key, pixels or None) batches; yields (key, [result dict
        per image] or None) in order. The encoder runs batch n+1 while a second thread
        beam-searches batch n (torch and ONNX Runtime release the GIL inside their kernels,
        so the two threads use two cores). Where `count` (the number of batches) is known,
        the last batch is beam-searched in two halves by two threads: the encoder has nothing
        left to do, and its core would otherwise idle until the end."""
        options = options or DecodeOptions()
        with ThreadPoolExecutor(2, thread_name_prefix="beam-search") as decoders:
            pending = None
            for n, (key, pixels) in enumerate(batches, 1):
                futures = None
                if pixels is not None:
                    features, spatial = self.encode_images(pixels)
                    # Halves only on the CPU, where the beam search's speed is the core it has.
                    parts = 2 if n == count and len(features) > 1 and self.device.type == "cpu" else 1
                    futures = [decoders.submit(self._decode, f, s, options)
                               for f, s in zip(features.tensor_split(parts), spatial.tensor_split(parts),
                                               strict=True)]
                if pending:
                    yield pending[0], _joined(pending[1])
                pending = key, futures
            if pending:
                yield pending[0], _joined(pending[1])

    @torch.inference_mode()  # inference mode is per thread: the decoding thread needs its own
    def _decode(self, features, spatial, options):
        return decode_features(self.model, self.vocab, features, options, spatial)

    def caption(self, images, options=None, **overrides):
        """Caption a path, http(s) URL, PIL image, bytes or binary file, or a list of them. A
        single input gives one dict, a list gives a list. Unreadable images and failed
        downloads raise images.ImageError;
        `caption(x, grounding=False)` and other DecodeOptions fields change the decoding."""
        options = decode_options(options, overrides)
        # A file object is one image, not an iterable of lines.
        single = isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray)) or hasattr(images, "read")
        items = [images] if single else list(images)
        if not items:
            return []
        pixels = torch.stack([preprocess(load_input(x)) for x in items])
        results = self.caption_pixels(pixels, options)
        return results[0] if single else results


def _joined(futures):
    """The results of a batch's beam searches (its parts, in order), or None for no pixels."""
    return [r for f in futures for r in f.result()] if futures else None


def file_captioner(weights=None, device=DEFAULT_DEVICE, backend=DEFAULT_BACKEND):
    """A Captioner set up for `caption_files` on this machine (the CLI, evaluation and the
    folder benchmark use it): on a CPU, threads for the encoder and the beam-search thread,
    which run at the same time, as machine.pipeline_threads shares the cores."""
    device = resolve_device(device)
    threads = None
    if device.type == "cpu":
        threads = pipeline_threads(resolve_backend(backend, device))
        torch.set_num_threads(threads)
    return Captioner.from_pretrained(weights, device=device, backend=backend, threads=threads)


def decode_options(options=None, overrides=None):
    """A DecodeOptions from an optional base and keyword changes (validated)."""
    options = options or DecodeOptions()
    return options.replace(**overrides) if overrides else options
