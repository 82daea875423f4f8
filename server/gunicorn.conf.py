"""gunicorn settings for the captioning server (`captioner serve` uses this file).

- No preload: each worker imports the app, and so loads the model, after the fork.
  Loading torch in the master and forking (--preload) can hang torch's thread pools.
- gthread workers: a worker serves several requests at once on threads, which is what
  lets the micro-batcher put concurrent requests into one model call.
- torch threads per worker = cores / workers, so workers x threads never exceeds the cores.
- Metrics: with several workers, each one writes its counters to PROMETHEUS_MULTIPROC_DIR
  and /metrics adds them up.
"""
import os
import tempfile

bind = os.environ.get("CAPTIONER_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("CAPTIONER_WORKERS", "1"))
worker_class = "gthread"
threads = int(os.environ.get("CAPTIONER_THREADS", "8"))
preload_app = False
timeout = 120  # a worker silent this long (stuck) is restarted
graceful_timeout = 30  # on SIGTERM, in-flight requests get this long to finish
keepalive = 5
limit_request_line = 8190
accesslog = os.environ.get("CAPTIONER_ACCESS_LOG", "-")

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="captioner-metrics-"))
TORCH_THREADS = max(1, (os.cpu_count() or 1) // workers)


def post_fork(server, worker):
    import torch

    torch.set_num_threads(TORCH_THREADS)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
