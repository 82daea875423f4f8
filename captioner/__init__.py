"""Image captioning: EfficientNet-Lite0 features initialise an LSTM decoder (Show and Tell),
and the encoder's own ImageNet classifier grounds the caption on the objects it is sure of."""
from .checkpoint import CheckpointError, load_model, save_checkpoint
from .images import ImageError, load_image, preprocess
from .inference import Captioner
from .model import CaptionModel, ModelConfig, beam_search, greedy_search
from .options import DecodeOptions
from .vocab import Vocabulary, tokenize

__all__ = ["Captioner", "DecodeOptions", "CaptionModel", "ModelConfig", "Vocabulary", "tokenize", "beam_search",
           "greedy_search", "load_image", "preprocess", "ImageError", "CheckpointError",
           "load_model", "save_checkpoint"]
__version__ = "0.1.0"
