"""Server memory under large images: one gunicorn worker, N parallel uploads of a
40-megapixel transparent PNG (a few hundred KB on the wire, 160 MB as RGBA).

Prints the worker's resident memory when idle, its peak while the uploads are served
(sampled every 20 ms) and 2 s after, and the statuses. `--root` serves another checkout of
the project (e.g. a `git worktree` of an earlier commit) to compare in the same run.

    .venv/bin/python benchmarks/serve_memory.py [--uploads 20] [--root .]
"""
import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw
from serve import free_port, post, wait_ready


@contextlib.contextmanager
def gunicorn_server(root, workers):
    """gunicorn serving the project at `root` on a free port; yields (base URL, process).
    `python -S` with site-packages on PYTHONPATH: no .pth files run, so an editable install
    of this project cannot put its own copy ahead of `root`'s; and `python -m` puts the
    working folder first on sys.path, so it runs in `root`."""
    port = free_port()
    site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**os.environ, "PYTHONPATH": f"{root}:{site}", "CAPTIONER_ACCESS_LOG": "/dev/null",
           "CAPTIONER_WEIGHTS": str(root / "weights" / "model.safetensors")}
    proc = subprocess.Popen([sys.executable, "-S", "-m", "gunicorn", "-c", str(root / "server" / "gunicorn.conf.py"),
                             "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "server.wsgi:app"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def big_png():
    img = Image.new("RGBA", (8000, 5000), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((2000, 1000, 6000, 4000), fill=(200, 120, 40, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    root = args.root.resolve()
    with gunicorn_server(root, 1) as (base, proc):
        worker = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
        data = big_png()
        time.sleep(1)
        idle = rss_mb(worker)
        peak, done = idle, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(worker))
                time.sleep(0.02)
        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.uploads) as pool:
            statuses = [status for _, status in pool.map(lambda _: post(base + "/v1/captions", data),
                                                         range(args.uploads))]
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
        time.sleep(2)
        after = rss_mb(worker)
    print(f"{root}: {args.uploads} parallel uploads of a {len(data) / 1024:.0f} KB 8000x5000 RGBA PNG, 1 worker")
    print(f"worker RSS: idle {idle:.0f} MB, peak {peak:.0f} MB, 2 s after {after:.0f} MB "
          f"(after / idle {after / idle:.2f}); {elapsed:.1f} s; statuses {sorted(set(statuses))}")


if __name__ == "__main__":
    main()
