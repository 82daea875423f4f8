"""Serving throughput: `captioner serve` on loopback under N concurrent clients, against
the CLI's batch pipeline on the same images in the same run.

Prints served images/s, p50/p95 request latency, served/CLI images/s, the count of 5xx answers and
the mean micro-batch (images per model call, from /metrics). Each request
carries one photo (1600x1200 JPEG made from the bundled examples), beam size 3. Also the server's ready
time: from starting `captioner serve` to its first 200 on /readyz (the workers have loaded the model and
captioned a warm-up image); `--ready-root` times that for other checkouts of the project too (a `git
worktree` of an earlier commit), started as gunicorn, alternating with this one, `--ready-runs` times each.

    .venv/bin/python benchmarks/serve.py [--clients 8] [--requests 200] [--workers N] [--ready-root DIR ...]
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from caption_folder import make_folder, pipeline  # same folder

from captioner.inference import file_captioner
from captioner.machine import default_server_workers
from captioner.options import DecodeOptions


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mean_batch(metrics):
    """Mean images per model call, from the server's captioner_batch_images histogram."""
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("captioner_batch_images_sum", "captioner_batch_images_count")):
            name, value = line.split()
            values[name] = float(value)
    return values["captioner_batch_images_sum"] / max(1.0, values["captioner_batch_images_count"])


def post(url, data):
    """-> (seconds, HTTP status)."""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/jpeg"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return time.perf_counter() - t0, status


def wait_ready(base, proc, timeout=180):
    """Poll /readyz until it answers 200. -> seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit("server exited before it was ready")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.02)
    sys.exit("server not ready in time")


def ready_times(roots, workers, runs):
    """{root: [seconds from starting gunicorn to ready]}, the roots taking turns."""
    from serve_memory import gunicorn_server  # it imports this module

    found = {root: [] for root in roots}
    for _ in range(runs):
        for root in roots:
            t0 = time.perf_counter()
            with gunicorn_server(root, workers):
                found[root].append(time.perf_counter() - t0)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=default_server_workers(), help="default: as captioner serve")
    parser.add_argument("--images", type=int, default=32, help="distinct photos to cycle through")
    parser.add_argument("--ready-root", type=Path, nargs="*", default=[],
                        help="other checkouts whose server ready time to compare with this one's")
    parser.add_argument("--ready-runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(Path(tmp), args.images)
        payloads = [p.read_bytes() for p in paths]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        captioner_cli = Path(sys.executable).with_name("captioner")
        started = time.perf_counter()
        proc = subprocess.Popen([str(captioner_cli), "serve", "--port", str(port), "--workers", str(args.workers),
                                 "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "CAPTIONER_ACCESS_LOG": "/dev/null"})
        try:
            wait_ready(base, proc)
            ready = time.perf_counter() - started
            for data in payloads[:4]:  # warm-up
                post(base + "/v1/captions", data)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                answers = list(pool.map(lambda i: post(base + "/v1/captions", payloads[i % len(payloads)]),
                                        range(args.requests)))
            served = args.requests / (time.perf_counter() - t0)
            backend = json.loads(urllib.request.urlopen(base + "/readyz").read())["backend"]
            batch = mean_batch(urllib.request.urlopen(base + "/metrics").read().decode())
            latencies = [t for t, _ in answers]
            server_errors = sum(status >= 500 for _, status in answers)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

        # The CLI's pipeline on the same sequence of images the clients sent.
        sequence = [paths[i % len(paths)] for i in range(args.requests)]
        captioner = file_captioner(device="cpu")  # what `captioner caption` runs
        options = DecodeOptions(beam_size=3)  # what the server uses by default: grounded, beam 3
        pipeline(captioner, paths[:4], options, 32, None)  # warm-up
        cli = pipeline(captioner, sequence, options, 32, None)

    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"{args.requests} requests, {args.clients} clients, {args.workers} worker(s), {os.cpu_count()} cpus, "
          f"beam 3, backend {backend} (CLI: {captioner.backend})")
    print(f"served          : {served:7.1f} images/s")
    print(f"latency p50/p95 : {statistics.median(latencies) * 1000:7.0f} / {p95 * 1000:.0f} ms")
    print(f"CLI batch       : {cli:7.1f} images/s ({args.requests} images, batch 32)")
    print(f"served / CLI    : {served / cli:7.2f}")
    print(f"5xx answers     : {server_errors}")
    print(f"images per call : {batch:7.1f} (mean micro-batch, warm-up included)")
    print(f"ready after     : {ready:7.2f} s (captioner serve)")
    if args.ready_root:
        here = Path(__file__).resolve().parent.parent
        roots = [here, *(r.resolve() for r in args.ready_root)]
        for root, times in ready_times(roots, args.workers, args.ready_runs).items():
            each = ", ".join(f"{t:.2f}" for t in times)
            print(f"ready after     : {statistics.median(times):7.2f} s median of {each} (gunicorn, {root})")


if __name__ == "__main__":
    main()
