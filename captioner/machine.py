"""The machine a process runs on: how many cores it may use, how to share them between
the encoder, the decoder and the image-decoding workers, whether the CPU computes bf16 in
hardware, where caches live, and how files are written so that a crash never leaves half
of one behind.

Kept free of torch, so that the CLI's --help and gunicorn's master can read it cheaply.
"""
import contextlib
import functools
import os
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("CAPTIONER_CACHE", Path.home() / ".cache" / "captioner"))


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


def default_server_workers():
    """Server worker processes when none are asked for: one per core up to 4 (each holds
    the model, about 0.5 GB, and cores / workers threads)."""
    return min(4, available_cores())


def pipeline_threads(backend, cores=None):
    """Threads for the encoder and torch when the encoder and the beam-search thread run at
    once (inference.caption_files): ONNX Runtime does best with half the cores, leaving the
    rest to the decoder; torch encoders scale with threads and get every core
    (benchmarks/caption_folder.py measures both)."""
    cores = cores or available_cores()
    return max(1, cores // 2) if backend.startswith("onnx") else cores


def decoding_workers(cores=None):
    """Image-decoding worker processes for a pipeline on `cores`: half of them, up to 4."""
    return max(1, min(4, (cores or available_cores()) // 2))


@functools.cache  # the CPU does not change while the process runs
def _cpu_flags():
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16():
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch
    emulates it, slower than fp32."""
    flags = _cpu_flags()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_has_vnni():
    """True where the CPU has VNNI (AVX512-VNNI or AVX-VNNI). Without it ONNX Runtime's int8
    kernels (uint8 activations x int8 weights) add pairs of products in 16 bits, which can
    saturate: int8 features drift further from fp32's (ONNX Runtime's quantisation docs)."""
    flags = _cpu_flags()
    return " avx512_vnni" in flags or " avx_vnni" in flags


@contextlib.contextmanager
def atomic_write(path, mode=0o644):
    """Yield a temporary path beside `path` to write to; when the block ends without an
    error it replaces `path` in one step (os.replace), readable by other users (`mode`:
    a server may run as another user; safetensors and torch write 0600). On an error the
    temporary file is removed and `path` is untouched. The temporary name starts with a dot
    and is unique per writer, so two processes never share one and no reader globbing for
    the real names sees it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(3).hex()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
