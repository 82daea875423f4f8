"""The state of a training run: train_state.pt in its folder, everything `captioner train
--resume` needs to continue exactly where the run stopped (weights, optimizer, learning-rate
schedule, early-stopping count, every process's random state, vocabulary, and the config the
run was started with). `save` writes it, `load` reads it, and `upgrade` brings the files of
earlier versions to the current layout, so that their runs still resume.
"""
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .concepts import ConceptMap, shipped_concepts
from .machine import atomic_write
from .model import ModelConfig
from .options import TrainConfig
from .vocab import Vocabulary

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"


@dataclass
class Progress:
    """Where a run stands between epochs."""
    base_lrs: list  # each parameter group's learning rate before the schedule scales it
    lr_decay_epochs: int  # the schedule's length, kept so that a resumed run follows the one it started with
    epoch: int = -1  # the last finished epoch, 0-based (-1: none yet)
    best: float = -math.inf  # the best validation score so far
    bad_epochs: int = 0  # epochs since the score last improved

    def record(self, epoch, score):
        """Count finished `epoch` and its validation `score`. -> whether it is the best so far."""
        improved = score > self.best
        self.epoch = epoch
        self.best, self.bad_epochs = (score, 0) if improved else (self.best, self.bad_epochs + 1)
        return improved


@dataclass
class RunState:
    """A run's train_state.pt, read (from_dict) or to be written (to_dict gives the file's layout)."""
    config: TrainConfig | None  # None for runs older than stored configs
    vocab: Vocabulary
    model_config: ModelConfig
    concepts: ConceptMap
    decoder: dict  # state dicts from here on
    encoder: dict | None  # only where the encoder trains
    optimizer: dict
    scaler: dict  # the fp16 loss scale ({} without fp16)
    progress: Progress
    rng: list  # each process's random state (rng_state), in rank order

    @classmethod
    def capture(cls, config, model, vocab, optimizer, scaler, progress, rngs):
        """The state of a run at the end of an epoch; `rngs`: every process's rng_state()."""
        return cls(config=config, vocab=vocab, model_config=model.config, concepts=model.concepts,
                   decoder=model.decoder.state_dict(),
                   encoder=model.encoder.state_dict() if model.encoder_tuned else None,
                   optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), progress=progress, rng=rngs)

    def to_dict(self):
        """The file's layout: tensors and plain values only, for torch.load(weights_only=True)."""
        p = self.progress
        return {
            "config": json.dumps(self.config.to_dict()), "decoder": self.decoder,
            **({"encoder": self.encoder} if self.encoder is not None else {}),
            "optimizer": self.optimizer, "scaler": self.scaler,
            "base_lrs": p.base_lrs, "lr_decay_epochs": p.lr_decay_epochs,
            "epoch": p.epoch, "best": p.best, "bad_epochs": p.bad_epochs,
            "rng": self.rng, "vocab": self.vocab.to_json(), "model_config": json.dumps(self.model_config.to_dict()),
            "concepts": self.concepts.to_json(),
        }

    @classmethod
    def from_dict(cls, raw):
        """A RunState from a train_state.pt of any version."""
        raw = upgrade(raw)
        return cls(config=TrainConfig.from_dict(json.loads(raw["config"])) if "config" in raw else None,
                   vocab=Vocabulary.from_json(raw["vocab"]),
                   model_config=ModelConfig(**json.loads(raw["model_config"])),
                   concepts=ConceptMap.from_json(raw["concepts"]),
                   decoder=raw["decoder"], encoder=raw.get("encoder"), optimizer=raw["optimizer"],
                   scaler=raw["scaler"],
                   progress=Progress(base_lrs=raw["base_lrs"], lr_decay_epochs=raw["lr_decay_epochs"],
                                     epoch=raw["epoch"], best=raw["best"], bad_epochs=raw["bad_epochs"]),
                   rng=raw["rng"])


def upgrade(raw):
    """A train_state.pt dict of an earlier version in the current layout (a new dict).
    Earlier versions stored the train() keywords of then as "settings" (or no settings at
    all), one process's random state as "torch_rng" and "python_rng", no loss scale, and no
    concept map (they trained with the shipped one)."""
    raw = dict(raw)
    if "config" not in raw and "settings" in raw:
        old = json.loads(raw.pop("settings"))
        old["workers"] = old.pop("num_workers", None)
        old["decode"] = {**(old.get("decode") or {}), "beam_size": old.pop("beam_size", 3)}
        raw["config"] = json.dumps({**old, "out": old.get("out") or "."})
    if "rng" not in raw and "torch_rng" in raw:
        raw["rng"] = [{"torch": raw.pop("torch_rng"), "python": raw.pop("python_rng")}]
    raw.setdefault("scaler", {})
    if "concepts" not in raw:
        raw["concepts"] = shipped_concepts().to_json()
    return raw


def save(state, path):
    """Write `state` to `path` atomically (a crash mid-write leaves the previous state),
    readable by others."""
    with atomic_write(path) as tmp:
        torch.save(state.to_dict(), tmp)


def load(path):
    return RunState.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def state_to_resume(config, resume):
    """The saved state of the run in config.out when resuming (None otherwise), refused
    where the run cannot continue as asked."""
    out = Path(config.out)
    state_file = out / STATE_FILE
    if resume and not state_file.is_file():
        raise FileNotFoundError(f"--resume: no {state_file} to resume from")
    if not resume and state_file.is_file():  # never overwrite an earlier run's checkpoints
        raise ValueError(f"{out} already holds a training run; use --resume to continue it, or another --out")
    if not resume:
        return None
    state = load(state_file)
    changed = config.fixed_differences(state.config) if state.config else []
    if changed:
        raise ValueError("--resume: " + "; ".join(changed)
                         + ". A started run keeps these; start a new run (another --out) to change them")
    return state


def stored_config(out):
    """The config a run in `out` was started with (its train_state.pt), or None."""
    state_file = Path(out) / STATE_FILE
    if not state_file.is_file():
        return None
    return load(state_file).config


def resume_config(out, values, given):
    """The config to resume the run in `out` with: its stored settings, with those named in
    `given` (the flags set on the command line) taken from `values` instead."""
    stored = stored_config(out)
    if stored is None:
        return TrainConfig(**values)
    merged = {**stored.to_dict(), **{k: v for k, v in values.items() if k in given}, "out": values["out"]}
    return TrainConfig.from_dict(merged)


def rng_state():
    """This process's random state, in types torch.load(weights_only=True) reads."""
    return {"torch": torch.get_rng_state(), "python": _list_state(random.getstate()),
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def restore_rng(states, procs):
    """Set this process's random state from a saved run's `states` (one per process)."""
    if len(states) != procs.world:
        log.warning("the run had %d process(es), now %d: its batches from here on differ from an "
                    "uninterrupted run's", len(states), procs.world)
    s = states[procs.rank % len(states)]
    torch.set_rng_state(s["torch"])
    random.setstate(_tuple_state(s["python"]))
    if torch.cuda.is_available() and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"])


def _list_state(s):  # random.getstate() nests tuples; keep it to lists/ints for weights_only
    return [list(x) if isinstance(x, tuple) else x for x in s]


def _tuple_state(s):
    return tuple(tuple(x) if isinstance(x, list) else x for x in s)
