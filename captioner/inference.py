"""The one inference path: the CLI, the server and training's validation all call
`Captioner` (or the decoding functions it wraps)."""
import os
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import load_model
from .images import image_loader, load_image, preprocess
from .model import beam_search, greedy_search

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "model.safetensors"
MAX_BEAM_SIZE = 10


def resolve_device(device="auto"):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def decode_features(model, vocab, features, beam_size=3, n_best=1, max_length=20):
    """Pooled image features -> one result dict per image:
    {"caption", "score", "log_prob", "alternatives": [{"caption", "score", "log_prob"}, ...]}
    `score` is the length-normalised log-probability that ranks the candidates, `log_prob`
    the caption's total log-probability, and `alternatives` the other n-best candidates."""
    if not 1 <= beam_size <= MAX_BEAM_SIZE:
        raise ValueError(f"beam_size must be between 1 and {MAX_BEAM_SIZE}")
    if not 1 <= n_best <= beam_size:
        raise ValueError("n_best must be between 1 and beam_size")
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    if beam_size == 1:
        hyps = greedy_search(model.decoder, features, max_length=max_length)
    else:
        hyps = beam_search(model.decoder, features, beam_size=beam_size, max_length=max_length, n_best=n_best)
    results = []
    for image_hyps in hyps:
        candidates = [{"caption": vocab.decode(ids), "score": round(score, 4), "log_prob": round(lp, 4)}
                      for ids, lp, score in image_hyps]
        results.append({**candidates[0], "alternatives": candidates[1:]})
    return results


class Captioner:
    """A loaded captioning model.

    >>> captioner = Captioner.from_pretrained()        # the shipped weights/
    >>> captioner.caption("photo.jpg")["caption"]
    """

    def __init__(self, model, vocab, device="cpu", info=None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.model.encoder.to(memory_format=torch.channels_last)
        self.vocab = vocab
        self.info = info or {}

    @classmethod
    def from_pretrained(cls, path=None, device="auto"):
        """Load a checkpoint file (or a folder holding model.safetensors); None means the
        default model shipped in weights/. Raises CheckpointError with a clear message."""
        model, vocab, info = load_model(path or DEFAULT_WEIGHTS)
        return cls(model, vocab, device, info)

    @property
    def name(self):
        return self.info.get("name", "captioner")

    @torch.inference_mode()
    def encode_images(self, pixels):
        """(B, 3, 224, 224) preprocessed pixels -> (B, feature_dim) features."""
        return self.model.encode_images(pixels.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def caption_pixels(self, pixels, beam_size=3, n_best=1, max_length=20):
        """Caption a batch of preprocessed images; one result dict each."""
        features = self.encode_images(pixels)
        return decode_features(self.model, self.vocab, features, beam_size, n_best, max_length)

    def caption_files(self, paths, beam_size=3, n_best=1, max_length=20, batch_size=32, num_workers=None):
        """Caption image files in batches while worker processes decode the next batch.
        Yields (index into paths, result dict or None, error message or None) for every
        file, in order: an unreadable file gets its error and the rest go on."""
        for idx, pixels, errors in image_loader(paths, batch_size, num_workers):
            results = dict(zip(idx, self.caption_pixels(pixels, beam_size, n_best, max_length))) \
                if pixels is not None else {}
            for i in sorted(set(idx) | set(errors)):
                yield i, results.get(i), errors.get(i)

    def caption(self, images, beam_size=3, n_best=1, max_length=20):
        """Caption a path, PIL image, bytes or binary file, or a list of them. A single input
        gives one dict, a list gives a list. Unreadable images raise images.ImageError."""
        # A file object is one image, not an iterable of lines.
        single = isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray)) or hasattr(images, "read")
        items = [images] if single else list(images)
        if not items:
            return []
        pixels = torch.stack([preprocess(load_image(x)) for x in items])
        results = self.caption_pixels(pixels, beam_size, n_best, max_length)
        return results[0] if single else results
