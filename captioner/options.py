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
