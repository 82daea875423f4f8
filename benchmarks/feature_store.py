"""The feature store against today's single-file cache, at COCO scale, on synthetic data.

No images and no model: N fake image keys with random 1280-d float32 features, written in
chunks of 2000 as an encoding run writes them, then read back as training does. Phases:
  write   N rows in chunks (new: a shard per chunk; old: the whole dict saved after every
          chunk and once more at the end, as train.py's compute_features did),
  reopen  open the cache (new: index the shards' keys; old: load_file of the whole file),
  random  reopen + gather 10k random rows,
  gather  reopen + gather every row in order (what training does before its first epoch).
Each phase of each approach runs in its own subprocess, so that its peak RSS (ru_maxrss)
is its own; "extra" is the peak above the child's RSS after imports and key generation.
The write phase includes making the random features (the same work for both).

With --spatial P (for an attention decoder) each image also gets a synthetic (P, dim)
float16 map, written with its feature to the store only (a single file of 15 GB is no
contender). The write phase then also reports the seconds spent inside store.write (making
the maps is left out); the store's files are flushed to disk after it, outside any timing.
The gather phase is skipped when its result (N x P x dim x 2 bytes) would need more than
half the RAM. --cold evicts the store's files from the page cache before each read phase
(posix_fadvise), so that those read the disk rather than what the write left in memory.

    .venv/bin/python benchmarks/feature_store.py [--images 120000] [--old-images N] [--dim 1280]
    .venv/bin/python benchmarks/feature_store.py --images 8091 --spatial 49 [--cold]
"""
import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("write", "reopen", "random", "gather")
ROOT = "/bench/images"  # fake: nothing is read from it


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def chunk(start, end, dim):
    """Keys, files and features (end - start, dim) of images start..end, the same in every run."""
    import torch

    keys = [hashlib.sha1(f"img{i}".encode()).hexdigest() for i in range(start, end)]
    files = [(f"{ROOT}/{i:012d}.jpg", 150_000 + i, 1_700_000_000_000_000_000 + i) for i in range(start, end)]
    feats = torch.randn(end - start, dim, generator=torch.Generator().manual_seed(start))
    return keys, files, feats


def chunk_maps(start, end, dim, positions):
    """Synthetic maps (end - start, positions, dim) float16 of images start..end, the same in
    every run: a random row per image plus a random map shared by all, a few times quicker to
    make than randn of every value (the write figure leaves it out all the same)."""
    import torch

    g = torch.Generator().manual_seed(start + 1)
    per_image = torch.randn(end - start, 1, dim, generator=g, dtype=torch.float16)  # (n, 1, D)
    return per_image + torch.randn(1, positions, dim, generator=g, dtype=torch.float16)  # (n, P, D)


def total(feats):
    """Sum of every value in float64, a block at a time (no float64 copy of the whole tensor)."""
    return sum(float(feats[s:s + 4096].double().sum()) for s in range(0, len(feats), 4096))


def child_spatial(phase, folder, n, dim, step, sample, positions):
    """One phase of the store with maps; prints its figures as child() does."""
    from captioner.feature_store import FeatureStore

    keys = [hashlib.sha1(f"img{i}".encode()).hexdigest() for i in range(n)]
    picked = random.Random(0).sample(range(n), min(sample, n))
    base = rss_mb()
    t0 = time.perf_counter()
    in_store, checked = 0.0, 0
    store = FeatureStore(folder, ROOT)
    if phase == "write":
        for s in range(0, n, step):
            k, f, x = chunk(s, min(n, s + step), dim)
            maps = chunk_maps(s, min(n, s + step), dim, positions)
            t = time.perf_counter()
            store.write(k, x, f, spatial=maps, backend="torch+maps", weights="bench")
            in_store += time.perf_counter() - t
    else:
        assert len(store) == n, (len(store), n)
        if phase != "reopen":
            rows = picked if phase == "random" else range(n)
            feats, maps, ok = store.gather([keys[i] for i in rows], dim, spatial=(positions, dim))
            assert all(ok) and maps.shape == (len(ok), positions, dim)
    seconds, peak = time.perf_counter() - t0, rss_mb()
    if phase in ("random", "gather"):  # the right rows came back: check a few against their source
        for j in range(0, len(rows), max(1, len(rows) // 5)):
            i = rows[j]
            start = i - i % step
            want = chunk_maps(start, min(n, start + step), dim, positions)[i - start]
            assert maps[j].equal(want) and feats[j].equal(chunk(start, min(n, start + step), dim)[2][i - start])
            checked += 1
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "extra_mb": peak - base, "in_store_s": in_store,
                      "checked": checked, "disk_mb": sum(p.stat().st_size for p in files) / 1e6,
                      "files": len(files)}))


def child(approach, phase, folder, n, dim, step, sample):
    import torch
    from safetensors.torch import load_file, save_file

    from captioner.feature_store import FeatureStore

    keys = [hashlib.sha1(f"img{i}".encode()).hexdigest() for i in range(n)]
    picked = [keys[i] for i in random.Random(0).sample(range(n), min(sample, n))]
    base = rss_mb()
    old_file = Path(folder) / "features-old.safetensors"
    t0 = time.perf_counter()
    feats = None
    if approach == "new":
        if phase == "write":
            store = FeatureStore(folder, ROOT)
            for s in range(0, n, step):
                k, f, x = chunk(s, min(n, s + step), dim)
                store.write(k, x, f, backend="torch", weights="bench")
        else:
            store = FeatureStore(folder, ROOT)
            assert len(store) == n, (len(store), n)
            if phase != "reopen":
                feats, ok = store.gather(picked if phase == "random" else keys, dim)
                assert all(ok)
    else:
        if phase == "write":
            cache = {}
            for s in range(0, n, step):
                k, _, x = chunk(s, min(n, s + step), dim)
                for key, row in zip(k, x, strict=True):
                    cache[key] = row.clone()
                tmp = old_file.with_name(old_file.name + ".tmp")
                save_file(cache, str(tmp))
                tmp.replace(old_file)
            save_file(cache, str(tmp))  # compute_features saved once more after its loop
            tmp.replace(old_file)
        else:
            cache = load_file(str(old_file))
            assert len(cache) == n
            if phase != "reopen":
                feats = torch.stack([cache[k] for k in (picked if phase == "random" else keys)])
    seconds, peak = time.perf_counter() - t0, rss_mb()
    checksum = None if feats is None else total(feats)  # both approaches must read the same rows
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "extra_mb": peak - base, "checksum": checksum,
                      "disk_mb": sum(p.stat().st_size for p in files) / 1e6, "files": len(files)}))


def run_child(*args):
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"child {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def store_files(folder):
    return [p for p in Path(folder).rglob("*.safetensors") if p.is_file()]


def flush(folder):
    """Write the store's dirty pages to disk, so that a later phase does not pay for them."""
    for p in store_files(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(folder):
    """Drop the store's files from the page cache, so that the next read goes to the disk
    (dirty pages are not dropped: main_spatial flushes them after the write phase)."""
    for p in store_files(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main_spatial(args):
    """The store with (P, dim) float16 maps: write, reopen, random and (if it fits) gather."""
    n, positions = args.images, args.spatial
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    result_bytes = n * positions * args.dim * 2  # the full gather's maps, float16
    row_bytes = positions * args.dim * 2 + args.dim * 4
    with tempfile.TemporaryDirectory(prefix="feature-store-spatial-", dir=args.tmp) as folder:
        for phase in PHASES:
            if phase == "gather" and result_bytes > ram / 2:
                print(f"gather: skipped, its maps alone take {result_bytes / 2**30:.1f} GiB, "
                      f"more than half of the {ram / 2**30:.1f} GiB of RAM", flush=True)
                continue
            if phase != "write" and args.cold:
                evict(folder)
            r = run_child("--child", "new", phase, "--folder", folder, "--images", n, "--dim", args.dim,
                          "--chunk", args.chunk, "--sample", args.sample, "--spatial", positions)
            if phase == "write":
                flush(folder)
            rows = {"random": min(args.sample, n), "gather": n}.get(phase)
            extra = (f", in store.write {r['in_store_s']:.2f} s" if phase == "write" else
                     f", {rows * row_bytes / 1e6 / r['seconds']:.0f} MB/s of rows" if rows else "")
            print(f"store + maps ({n} images, P={positions}{', cold' if args.cold else ''}) {phase:6s}: "
                  f"{r['seconds']:8.2f} s{extra}, peak RSS {r['peak_mb']:7.0f} MB (+{r['extra_mb']:.0f} MB), "
                  f"on disk {r['disk_mb']:.0f} MB in {r['files']} files", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120_000)
    parser.add_argument("--old-images", type=int, default=None,
                        help="images for today's approach (default: --images); less if it takes too long")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--sample", type=int, default=10_000, help="rows of the random read")
    parser.add_argument("--tmp", default=None, help="where to write the caches (default: the system temp folder)")
    parser.add_argument("--spatial", type=int, default=0, metavar="P",
                        help="also store a (P, dim) float16 map per image, in the store only (default 0: none)")
    parser.add_argument("--cold", action="store_true",
                        help="with --spatial: evict the store's files from the page cache before each read phase")
    parser.add_argument("--child", nargs=2, metavar=("APPROACH", "PHASE"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold and not args.spatial:
        parser.error("--cold goes with --spatial")
    if args.child and args.spatial:
        return child_spatial(args.child[1], args.folder, args.images, args.dim, args.chunk, args.sample, args.spatial)
    if args.child:
        return child(*args.child, args.folder, args.images, args.dim, args.chunk, args.sample)
    if args.spatial:
        return main_spatial(args)
    sizes = {"new": args.images, "old": args.old_images or args.images}
    results = {}
    for approach in ("new", "old"):
        n = sizes[approach]
        with tempfile.TemporaryDirectory(prefix=f"feature-store-{approach}-", dir=args.tmp) as folder:
            for phase in PHASES:
                r = run_child("--child", approach, phase, "--folder", folder, "--images", n, "--dim", args.dim,
                              "--chunk", args.chunk, "--sample", args.sample)
                results[approach, phase] = r
                print(f"{approach} ({n} images) {phase:6s}: {r['seconds']:8.2f} s, peak RSS {r['peak_mb']:7.0f} MB "
                      f"(+{r['extra_mb']:.0f} MB), on disk {r['disk_mb']:.0f} MB in {r['files']} files", flush=True)
    if sizes["new"] != sizes["old"]:
        print(f"note: today's approach measured at {sizes['old']} images, the store at {sizes['new']}: "
              "ratios compare different sizes")
    for phase in PHASES:
        new, old = results["new", phase], results["old", phase]
        if new["checksum"] is not None and sizes["new"] == sizes["old"]:
            assert abs(new["checksum"] - old["checksum"]) < 1e-6 * max(1.0, abs(old["checksum"])), phase
        print(f"{phase:6s}: old/new time {old['seconds'] / max(new['seconds'], 1e-9):7.1f}x, "
              f"old/new peak RSS {old['peak_mb'] / new['peak_mb']:5.1f}x "
              f"(extra over imports: {old['extra_mb']:.0f} MB vs {new['extra_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
