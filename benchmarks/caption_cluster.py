"""The Ray engine against the plain CLI on one machine, in one run, as users run them.

Both commands caption the same folder of photo-sized JPEGs (1600x1200, made from the
bundled examples) with the shipped model, beam 3, grounded, the default backend:

    captioner caption FOLDER -o out.jsonl
    captioner caption FOLDER --engine ray -o out/       (a local Ray instance)

Each is timed end to end (Python start, model loading, Ray start) on `--images` photos and
on `--few` photos: the difference gives its steady rate ((images - few) / (time - time of
few)), and the time of the small run its start-up cost. Prints both rates, their ratio,
and each start-up time.

    .venv/bin/python benchmarks/caption_cluster.py [--images 512] [--few 8] [--actors 1] [--gpus-per-actor 0]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caption_folder import make_folder

CAPTIONER = Path(sys.executable).with_name("captioner")


def timed(args):
    t0 = time.perf_counter()
    subprocess.run([str(CAPTIONER), "caption", *map(str, args)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--few", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "all").mkdir()
        (tmp / "few").mkdir()
        paths = make_folder(tmp / "all", args.images)
        for p in paths[:args.few]:
            (tmp / "few" / p.name).symlink_to(p)
        ray_flags = ["--engine", "ray", "--actors", args.actors, "--gpus-per-actor", args.gpus_per_actor]
        times = {}
        for name, folder, n in (("few", tmp / "few", args.few), ("all", tmp / "all", args.images)):
            times["cli", name] = timed([folder, "-o", tmp / f"cli-{name}.jsonl"])
            times["ray", name] = timed([folder, "-o", tmp / f"ray-{name}", *ray_flags])
            print(f"{n} images: CLI {times['cli', name]:.1f} s, Ray {times['ray', name]:.1f} s", flush=True)
        records = sum(1 for shard in (tmp / "ray-all").glob("*.json") for _ in open(shard))
        assert records == args.images, records
    rate = {e: (args.images - args.few) / (times[e, "all"] - times[e, "few"]) for e in ("cli", "ray")}
    print(f"{args.images} JPEGs of 1600x1200, beam 3, {os.cpu_count()} CPUs, Ray: {args.actors} actor(s), "
          f"{args.gpus_per_actor} GPU each")
    print(f"CLI                 : {rate['cli']:7.1f} images/s steady, {args.images / times['cli', 'all']:.1f} "
          f"end to end; {times['cli', 'few']:.1f} s for {args.few} images")
    print(f"Ray engine          : {rate['ray']:7.1f} images/s steady, {args.images / times['ray', 'all']:.1f} "
          f"end to end; {times['ray', 'few']:.1f} s for {args.few} images")
    print(f"Ray / CLI           : {rate['ray'] / rate['cli']:7.2f} steady, "
          f"{times['cli', 'all'] / times['ray', 'all']:.2f} end to end")
    print(f"Ray start-up extra  : {times['ray', 'few'] - times['cli', 'few']:7.1f} s")


if __name__ == "__main__":
    main()
