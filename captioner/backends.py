"""Encoder backends: the same EfficientNet-Lite features, the pooled vector and the spatial
map it is the mean of, from torch fp32 (the reference), torch with bf16 autocast, or ONNX
Runtime in fp32 or static int8. Every backend returns both from one pass.

On a CPU the encoder is nearly the whole cost of a caption, and its speed depends on the
machine: bf16 beats fp32 where the CPU has native bf16 (avx512_bf16 / AMX) and is slower
than fp32 where it is emulated; ONNX Runtime fp32 beats torch fp32. `auto` picks the fastest
backend whose captions are as good as fp32's (see CIDER_VS_FP32) among those this machine
runs well. The decoder and the encoder's classifier head stay in torch fp32.

The ONNX files come from export.onnx_file: exported from the checkpoint's own encoder
weights when first needed, and cached.
"""
import logging
from pathlib import Path

import torch

from .export import onnx_file
from .machine import cpu_has_native_bf16, cpu_has_vnni
from .options import BACKENDS, DEFAULT_BACKEND

log = logging.getLogger(__name__)

# Flickr8k test CIDEr of each backend relative to torch fp32's, shipped model, beam 3,
# grounded (benchmarks/backend_quality.py; the figures are in benchmarks/README.md; bf16's
# is the previous model's, measured where the CPU has bf16). `auto` never picks a backend
# below MIN_CIDER_RATIO, so int8 is opt-in.
CIDER_VS_FP32 = {"torch": 1.0, "torch-bf16": 0.997, "onnx": 1.0, "onnx-int8": 0.950}
MIN_CIDER_RATIO = 0.99
AUTO_ORDER = ("onnx", "torch-bf16", "onnx-int8")  # fastest end to end first (benchmarks/caption_folder.py)
# How far each backend's features may be from fp32's: the relative error |f - f32| / |f32|
# of one image's pooled feature (and of its spatial map, whole), set just above what real
# photos give (tests/test_backends.py checks it on skimage's photos) on a CPU with bf16 and
# VNNI in hardware.
FEATURE_TOLERANCE = {"torch": 1e-5, "torch-bf16": 0.1, "onnx": 1e-4, "onnx-int8": 0.3}
# On a CPU without them: emulated bf16 (maps 0.100 off) and int8 whose products saturate
# (pooled 0.52, maps 0.68 off on skimage's photos and the examples, an AMD EPYC with AVX2).
FEATURE_TOLERANCE_WITHOUT_HARDWARE = {"torch-bf16": 0.12, "onnx-int8": 0.75}


def feature_tolerance(backend):
    """FEATURE_TOLERANCE for `backend` on this CPU."""
    if backend == "torch-bf16" and not cpu_has_native_bf16() or backend == "onnx-int8" and not cpu_has_vnni():
        return FEATURE_TOLERANCE_WITHOUT_HARDWARE[backend]
    return FEATURE_TOLERANCE[backend]


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
    """The backend `auto` means on `device`: torch on a GPU; on a CPU the first of
    AUTO_ORDER that captions as well as fp32 (CIDER_VS_FP32) and runs natively here (bf16
    only where the CPU has it in hardware, ONNX only where onnxruntime is installed)."""
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


class TorchEncoder:
    """The torch encoder, fp32 or under bf16 autocast."""

    def __init__(self, encoder, device, bf16=False):
        self.encoder = encoder.to(device, memory_format=torch.channels_last).eval()
        self.device = device
        self.bf16 = bf16
        self.name = "torch-bf16" if bf16 else "torch"

    @torch.inference_mode()
    def __call__(self, pixels):
        """(B, 3, 224, 224) preprocessed pixels -> float32 (pooled (B, D), spatial (B, P, D))."""
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pooled, spatial = self.encoder.forward_maps(x)
        return pooled.float(), spatial.float()


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
        """As TorchEncoder: -> (pooled (B, D), spatial (B, P, D)), float32."""
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        pooled, spatial = self.session.run(["features", "spatial"], {"pixels": x})
        return torch.from_numpy(pooled), torch.from_numpy(spatial)


def load_backend(encoder, backend=DEFAULT_BACKEND, device=torch.device("cpu"), cache_dir=None, threads=None,
                 calibration=None):
    """An encoder callable (pixels -> (pooled, spatial)) for `encoder` (an EfficientNetLite).
    `calibration`: a folder of photos for int8 calibration (default: the bundled examples)."""
    chosen = resolve_backend(backend, device)
    if chosen.startswith("onnx"):
        if device.type != "cpu":
            raise ValueError(f"backend {chosen} runs on the CPU; use torch on {device}")
        if not onnxruntime_available():
            raise ValueError(f"backend {chosen} needs onnxruntime: pip install onnxruntime onnx")
    if backend == "auto":
        why = ": this CPU computes bf16 natively" if chosen == "torch-bf16" else ""
        log.info("encoder backend: %s (auto's choice on %s%s)", chosen, device, why)
    if chosen == "onnx-int8" and not cpu_has_vnni():
        log.warning("this CPU has no VNNI: ONNX Runtime's int8 products can saturate here, and the int8 "
                    "encoder's features are further from fp32's than on a CPU with VNNI (docs/backends.md)")
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
