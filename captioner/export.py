"""The encoder as an ONNX file: exported from a checkpoint's own encoder weights (fp32), or
quantised to static int8 with activation ranges measured on real photos.

`onnx_file` keeps both under the cache folder, named by a hash of the weights, so a
fine-tuned encoder gets its own file and a changed one is exported again. `captioner export`
writes them to a path of the user's choosing instead.
"""
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .encoder import IMAGE_SIZE
from .images import find_images, load_image, preprocess
from .machine import DEFAULT_CACHE_DIR, atomic_write

log = logging.getLogger(__name__)

ONNX_EXPORT_VERSION = "v2"  # bump when the export or quantisation recipe changes
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # the default int8 calibration photos
CALIBRATION_LIMIT = 64  # photos read for int8 calibration


def weights_hash(encoder):
    """A short hash of the encoder's weights (and ONNX_EXPORT_VERSION), naming its ONNX files
    and, in the feature store, the features it encoded."""
    h = hashlib.sha256(ONNX_EXPORT_VERSION.encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def onnx_file(encoder, cache_dir=None, int8=False, calibration=None):
    """The cached ONNX file of `encoder` (fp32, or int8), exported first if missing. A
    cache folder that cannot be written (a read-only container) falls back to a temp folder."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    name = f"encoder-{weights_hash(encoder)}{'-int8' if int8 else ''}.onnx"
    for folder in (cache_dir, Path(tempfile.gettempdir()) / "captioner"):
        path = folder / name
        if path.is_file():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if int8:
                quantize_int8(onnx_file(encoder, folder), path, calibration)
            else:
                export_onnx(encoder, path)
            return path
        except PermissionError as e:
            log.warning("cannot write %s (%s); trying a temp folder", folder, e)
    raise OSError(f"no writable folder for {name}")


class _PooledAndMaps(torch.nn.Module):
    """The encoder as exported: both of EfficientNetLite.forward_maps's outputs."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels):
        return self.encoder.forward_maps(pixels)


def export_onnx(encoder, out):
    """Export `encoder` to `out`: pixels (B, 3, 224, 224) -> "features", the pooled vector
    (B, D), and "spatial", the map it is the mean of (B, P, D), from one pass."""
    out = Path(out)
    encoder = encoder.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    log.info("exporting the encoder to %s", out)
    with warnings.catch_warnings():  # "same" padding is traced as constants for 224x224: intended
        warnings.simplefilter("ignore")
        with atomic_write(out) as tmp:
            # .eval(): export puts the module back in the mode it found it in, and a new wrapper is in
            # training mode, which would leave the encoder's BatchNorm layers training afterwards.
            torch.onnx.export(_PooledAndMaps(encoder).eval(), (example,), str(tmp), input_names=["pixels"],
                              output_names=["features", "spatial"],
                              dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}, "spatial": {0: "batch"}},
                              opset_version=17, dynamo=False)
    return out


def calibration_images(folder=None, limit=CALIBRATION_LIMIT):
    """Real photos for int8 calibration: `folder`, or the bundled examples."""
    folder = Path(folder) if folder else EXAMPLES
    paths = find_images([folder], recursive=True)[:limit] if folder.is_dir() else []
    if not paths:
        raise ValueError(f"int8 calibration needs photos: none found in {folder} (pass a calibration folder)")
    return paths


def calibration_batches(paths):
    """One batch of encoder input per photo: the photo whole and as a few crops and flips, so
    that a handful of photos still spans realistic activations. Seeded: the same photos give
    the same batches, and so the same int8 file, every time."""
    import torchvision.transforms.v2 as T  # here: importing torchvision costs seconds (images.preprocess)

    crop = T.Compose([T.RandomResizedCrop(IMAGE_SIZE, scale=(0.4, 1.0), antialias=True),
                      T.RandomHorizontalFlip()])
    views = [preprocess] + [T.Compose([crop, preprocess])] * 3
    torch.manual_seed(0)
    return [torch.stack([view(load_image(p)) for view in views]).numpy() for p in paths]


def quantize_int8(fp32_path, out, calibration=None):
    """Static int8 quantisation (QDQ, per-channel weights) of an fp32 ONNX encoder, with
    activation ranges measured on real photos (`calibration`, a folder; default the bundled
    examples)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    paths = calibration_images(calibration)
    batches = calibration_batches(paths)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {"pixels": batch}

    out = Path(out)
    prepared = out.with_name(f"{out.name}.{os.getpid()}.prep")
    ort.set_default_logger_severity(3)
    log.info("quantising the encoder to int8 (%d calibration photos) -> %s", len(paths), out)
    logging.disable(logging.INFO)  # the quantiser logs a line per adjusted channel scale
    try:
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph clean-up first
        with atomic_write(out) as tmp:
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            extra_options={"CalibMovingAverage": True})  # best top-1 agreement of the variants tried
    finally:
        logging.disable(logging.NOTSET)
        prepared.unlink(missing_ok=True)
    return out
