"""A small request while the server is flooded with expensive ones.

`--flood` clients each send one multipart request with 16 copies of a 174 KB 8000x5000
transparent PNG (2.8 MB on the wire, 16 x 40 megapixels to decode); meanwhile a normal
client sends a 35 KB JPEG every 0.25 s. Prints the normal requests' latencies and statuses
and the flood's statuses. `--root` serves another checkout (see serve_memory.py).

    .venv/bin/python benchmarks/serve_saturation.py [--flood 8] [--workers 2] [--root .]
"""
import argparse
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serve import post
from serve_memory import big_png, gunicorn_server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def multipart(files):
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{i}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    small = (EXAMPLES / "cat.jpg").read_bytes()
    body, content_type = multipart([big_png()] * 16)
    with gunicorn_server(args.root.resolve(), args.workers) as (base, _):
        time.sleep(1)  # every worker up

        def flood_one(_):
            req = urllib.request.Request(base + "/v1/captions", data=body, method="POST",
                                         headers={"Content-Type": content_type})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code
        normal, done = [], threading.Event()

        def probe():
            while not done.is_set():
                normal.append(post(base + "/v1/captions", small))
                time.sleep(0.25)
        start = time.perf_counter()
        prober = threading.Thread(target=probe)
        with ThreadPoolExecutor(args.flood) as pool:
            flood = pool.map(flood_one, range(args.flood))
            time.sleep(0.2)
            prober.start()
            flood = list(flood)
        elapsed = time.perf_counter() - start
        done.set()
        prober.join()
    worst = max(t for t, _ in normal)
    print(f"{args.root.resolve()}: {args.flood} requests of 16 x 40 MP PNG ({len(body) / 1e6:.1f} MB each), "
          f"{args.workers} workers")
    print(f"flood: statuses {sorted(flood)} in {elapsed:.1f} s")
    print(f"normal 35 KB requests meanwhile: {len(normal)}, statuses {sorted({s for _, s in normal})}, "
          f"slowest {worst:.2f} s, median {sorted(t for t, _ in normal)[len(normal) // 2]:.2f} s")


if __name__ == "__main__":
    main()
