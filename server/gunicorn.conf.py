"""gunicorn settings for the captioning server (`captioner serve` uses this file).

- No preload: each worker imports the app, and so loads the model, after the fork.
  Loading torch in the master and forking (--preload) can hang torch's thread pools.
- gthread workers: a worker serves several requests at once on threads, which is what
  lets the micro-batcher put concurrent requests into one model call.
- torch (and ONNX Runtime) threads per worker = cores / workers, so workers x threads never
  exceeds the cores.
  "Cores" are the ones this container may use (CPU affinity and a cgroup CPU quota such as
  docker's --cpus / compose's cpus limit), not the host's; CAPTIONER_TORCH_THREADS overrides.
- Metrics: with several workers, each one writes its counters to PROMETHEUS_MULTIPROC_DIR
  and /metrics adds them up.
"""
import os
import tempfile

from captioner.machine import available_cores, default_server_workers  # torch-free: safe in the master

bind = os.environ.get("CAPTIONER_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("CAPTIONER_WORKERS") or default_server_workers())
worker_class = "gthread"
threads = int(os.environ.get("CAPTIONER_THREADS", "8"))
preload_app = False
timeout = 120  # a worker silent this long (stuck) is restarted
graceful_timeout = 30  # on SIGTERM, in-flight requests get this long to finish
keepalive = 5
limit_request_line = 8190
accesslog = os.environ.get("CAPTIONER_ACCESS_LOG", "-")
# No runtime control socket (recent gunicorn makes one in ~/.gunicorn): nothing here uses it,
# and two servers on one machine (tests, benchmark) would fight over the path.
control_socket_disable = True

if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # ours to remove when the server stops
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir = tempfile.mkdtemp(prefix="captioner-metrics-")
else:
    _metrics_dir = None


def post_fork(server, worker):
    import ctypes
    import ctypes.util

    import torch

    # Two malloc arenas, not one per thread: a burst of large decodes on many request threads
    # otherwise leaves each arena holding its peak (MALLOC_ARENA_MAX=2, set from inside).
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)  # M_ARENA_MAX

    # server.num_workers, not `workers` above: --workers on the command line wins over this file.
    threads = int(os.environ.get("CAPTIONER_TORCH_THREADS") or max(1, available_cores() // server.num_workers))
    torch.set_num_threads(threads)
    worker.log.info("worker %s: %d torch threads", worker.pid, threads)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _metrics_dir:
        import shutil

        shutil.rmtree(_metrics_dir, ignore_errors=True)
