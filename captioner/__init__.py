"""Image captioning: EfficientNet-Lite0 features initialise an LSTM decoder (Show and Tell),
and the encoder's own ImageNet classifier grounds the caption on the objects it is sure of.

The names below are imported on first use, so that `captioner --help` (and anything that
only needs `captioner.options`) starts without loading torch."""
import importlib

_EXPORTS = {
    "Captioner": "inference", "DecodeOptions": "options", "CaptionModel": "model", "ModelConfig": "model",
    "Vocabulary": "vocab", "tokenize": "vocab", "beam_search": "model", "greedy_search": "model",
    "load_image": "images", "preprocess": "images", "ImageError": "images", "CheckpointError": "checkpoint",
    "load_model": "checkpoint", "save_checkpoint": "checkpoint",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
