"""Time to encode a training set's photos into the feature cache, per encoder backend.

What `captioner train` does before its first epoch (frozen encoder): every train and
validation photo is decoded and encoded once. Each backend starts from an empty cache
folder, in the same run.

    .venv/bin/python benchmarks/encode_dataset.py [--data ../shared/data/flickr8k] [--backends torch auto]
"""
import argparse
import tempfile
import time

from captioner.data import read_dataset
from captioner.inference import Captioner
from captioner.features import compute_features


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--backends", nargs="+", default=["torch", "auto"])
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    paths = [r.image for r in read_dataset(args.data) if r.split in ("train", "val")]
    model = Captioner.from_pretrained(device="cpu", backend="torch").model
    rates = {}
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            compute_features(model, paths, model.encoder._fc.weight.device, cache, num_workers=args.workers,
                             backend=backend, spatial=model.config.attention)
            seconds = time.perf_counter() - t0
        rates[backend] = seconds
        print(f"{backend}: {len(paths)} photos in {seconds:.0f} s ({len(paths) / seconds:.1f} images/s)", flush=True)
    first = args.backends[0]
    for backend in args.backends[1:]:
        print(f"{backend} vs {first}: {rates[first] / rates[backend]:.2f}x faster")


if __name__ == "__main__":
    main()
