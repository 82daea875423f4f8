"""Encoder backends: the same pooled EfficientNet-Lite features from torch fp32 (the
reference), torch with bf16 autocast, or ONNX Runtime in fp32 or static int8.

On a CPU the encoder is nearly the whole cost of a caption, and its speed depends on the
machine: bf16 is ~3x fp32 where the CPU has native bf16 (avx512_bf16 / AMX) and slower
than fp32 where it is emulated; ONNX Runtime fp32 is ~2x torch everywhere. `auto` picks
the fastest backend whose captions are as good as fp32's (see CIDER_VS_FP32) among those
this machine runs well. The decoder and the encoder's classifier head stay in torch fp32.

ONNX files are exported from the checkpoint's own encoder weights when first needed and
cached under the feature cache folder, named by a hash of those weights, so a fine-tuned
encoder gets its own file and a changed one is re-exported.
"""
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .encoder import IMAGE_SIZE
from .options import BACKENDS, DEFAULT_BACKEND, available_cores

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("CAPTIONER_CACHE", Path.home() / ".cache" / "captioner"))
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ONNX_EXPORT_VERSION = "v1"  # bump when the export or quantisation recipe changes
# Flickr8k test CIDEr of each backend / torch fp32's (0.483), shipped model, beam 3,
# grounded: `benchmarks/backend_quality.py`, README "Encoder backends". `auto` never picks
# a backend below MIN_CIDER_RATIO, so int8 (0.466, 70% of captions unchanged) is opt-in.
CIDER_VS_FP32 = {"torch": 1.0, "torch-bf16": 0.997, "onnx": 1.0, "onnx-int8": 0.965}
MIN_CIDER_RATIO = 0.99
AUTO_ORDER = ("onnx", "torch-bf16", "onnx-int8")  # fastest end to end first (caption_folder.py)
# How far each backend's features may be from fp32's: the relative error |f - f32| / |f32|
# of one image's pooled feature. Seen on real photos (skimage's, 80 COCO): bf16 up to 0.08,
# ONNX fp32 and torch in channels_last under 1e-5, int8 up to 0.26 (mean 0.12). Tested on skimage's photos.
FEATURE_TOLERANCE = {"torch": 1e-5, "torch-bf16": 0.1, "onnx": 1e-4, "onnx-int8": 0.3}


def cpu_has_native_bf16():
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch
    emulates it, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def onnxruntime_available():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, device):
    """`backend` with "auto" replaced by what it means on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return choose_backend(device) if backend == "auto" else backend


def choose_backend(device):
    """The backend `auto` means on `device`: torch on a GPU; on a CPU the fastest one
    that captions as well as fp32 and runs natively here. Measured on a 2-core
    avx512_bf16 machine (README "Encoder backends"): ONNX Runtime fp32 is the fastest of
    those, encoder alone and end to end, and its captions are fp32's; bf16 is next, and
    only where the CPU has it in hardware."""
    if device.type != "cpu":
        return "torch"
    for backend in AUTO_ORDER:
        if CIDER_VS_FP32[backend] < MIN_CIDER_RATIO:
            continue
        if backend == "torch-bf16" and cpu_has_native_bf16():
            return backend
        if backend.startswith("onnx") and onnxruntime_available():
            return backend
    return "torch"


def pipeline_threads(backend, cores=None):
    """Threads for the encoder and torch when `caption_files` runs the encoder and the
    beam-search thread at once. Measured on 2 cores (folder of 1600x1200 JPEGs, one decoding
    worker): ONNX Runtime is best with half the cores each (43 images/s against 38 with
    every core); torch encoders scale better with threads and get every core (bf16: 37
    against 32)."""
    cores = cores or available_cores()
    return max(1, cores // 2) if backend.startswith("onnx") else cores


def decoding_workers(cores=None):
    """Image-decoding worker processes for a pipeline on `cores`: half of them, up to 4."""
    return max(1, min(4, (cores or available_cores()) // 2))


class TorchEncoder:
    """The torch encoder, fp32 or under bf16 autocast."""

    def __init__(self, encoder, device, bf16=False):
        self.encoder = encoder.to(device, memory_format=torch.channels_last).eval()
        self.device = device
        self.bf16 = bf16
        self.name = "torch-bf16" if bf16 else "torch"

    @torch.inference_mode()
    def __call__(self, pixels):
        """(B, 3, 224, 224) preprocessed pixels -> (B, feature_dim) float32 features."""
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.encoder(x).float()


class OnnxEncoder:
    """The encoder exported to ONNX, run by ONNX Runtime on the CPU."""

    def __init__(self, path, threads, name="onnx"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: ORT's warnings are about its own graph clean-up
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path = Path(path)
        self.device = torch.device("cpu")
        self.name = name

    def __call__(self, pixels):
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"pixels": x})[0])


def load_backend(encoder, backend=DEFAULT_BACKEND, device=torch.device("cpu"), cache_dir=None, threads=None,
                 calibration=None):
    """An encoder callable (pixels -> features) for `encoder` (an EfficientNetLite).
    `calibration`: a folder of photos for int8 calibration (default: the bundled examples)."""
    chosen = resolve_backend(backend, device)
    if chosen.startswith("onnx"):
        if device.type != "cpu":
            raise ValueError(f"backend {chosen} runs on the CPU; use torch on {device}")
        if not onnxruntime_available():
            raise ValueError(f"backend {chosen} needs onnxruntime: pip install onnxruntime onnx")
    if backend == "auto":
        log.info("encoder backend: %s (auto on %s%s)", chosen, device,
                 ", native bf16" if device.type == "cpu" and cpu_has_native_bf16() else "")
    if chosen == "torch":
        return TorchEncoder(encoder, device)
    if chosen == "torch-bf16":
        return TorchEncoder(encoder, device, bf16=True)
    threads = threads or torch.get_num_threads()  # what the process gave torch (gunicorn: cores / workers)
    try:
        path = onnx_file(encoder, cache_dir, int8=chosen == "onnx-int8", calibration=calibration)
    except ValueError as e:  # no calibration photos (an install without examples/)
        if backend != "auto":
            raise
        log.warning("%s; using onnx (fp32) instead of onnx-int8", e)
        chosen = "onnx"
        path = onnx_file(encoder, cache_dir)
    try:
        return OnnxEncoder(path, threads, chosen)
    except Exception as e:  # a damaged cached file (truncated by a crash, a full disk): rebuild it
        log.warning("cached %s is unusable (%s); exporting it again", path, e)
        path.unlink(missing_ok=True)
        path = onnx_file(encoder, cache_dir, int8=chosen == "onnx-int8", calibration=calibration)
        return OnnxEncoder(path, threads, chosen)


def weights_hash(encoder):
    """A short hash of the encoder's weights, naming its ONNX files."""
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


def export_onnx(encoder, out):
    """Export `encoder` (pixels (B, 3, 224, 224) -> pooled features (B, D)) to `out`."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    encoder = encoder.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    log.info("exporting the encoder to %s", out)
    with warnings.catch_warnings():  # "same" padding is traced as constants for 224x224: intended
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (example,), str(tmp), input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17, dynamo=False)
    tmp.replace(out)  # atomic: a crash never leaves a half-written file under the real name
    return out


def calibration_images(folder=None, limit=64):
    """Real photos for int8 calibration: `folder`, or the bundled examples."""
    from .images import find_images

    folder = Path(folder) if folder else EXAMPLES
    paths = find_images([folder], recursive=True)[:limit] if folder.is_dir() else []
    if not paths:
        raise ValueError(f"int8 calibration needs photos: none found in {folder} (pass a calibration folder)")
    return paths


def quantize_int8(fp32_path, out, calibration=None):
    """Static int8 quantisation (QDQ, per-channel weights) of an fp32 ONNX encoder, with
    activation ranges measured on real photos. Each photo is seen whole and as a few crops
    and flips, so that a handful of photos still spans realistic activations."""
    import torchvision.transforms.v2 as T
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .images import load_image, preprocess

    views = [preprocess]
    crop = T.Compose([T.RandomResizedCrop(IMAGE_SIZE, scale=(0.4, 1.0), antialias=True),
                      T.RandomHorizontalFlip()])
    views += [T.Compose([crop, preprocess])] * 3
    paths = calibration_images(calibration)
    torch.manual_seed(0)  # the same calibration, and so the same file, every time
    batches = [torch.stack([view(load_image(p)) for view in views]).numpy() for p in paths]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {"pixels": batch}

    out = Path(out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    prepared = out.with_name(f"{out.name}.{os.getpid()}.prep")
    ort.set_default_logger_severity(3)
    log.info("quantising the encoder to int8 (%d calibration photos) -> %s", len(paths), out)
    logging.disable(logging.INFO)  # the quantiser logs a line per adjusted channel scale
    try:
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph clean-up first
        quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"CalibMovingAverage": True})  # best top-1 agreement of the variants tried
    finally:
        logging.disable(logging.NOTSET)
        prepared.unlink(missing_ok=True)
    tmp.replace(out)
    return out
