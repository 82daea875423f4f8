"""Folder-captioning throughput: the CLI's pipeline against a naive per-image loop.

Both caption the same folder of photo-sized JPEGs (made from the bundled examples at
1600x1200, like a phone photo scaled down) with the same model and beam size, in the
same run. The baseline is the tutorial way: open, convert, preprocess and caption one
image at a time. The pipeline is what `captioner caption` runs: worker processes decode
(JPEG draft mode) while the model captions the previous batch. The pipeline runs with
grounding on (the default) and off, so the cost of grounded decoding is printed as a
ratio; `--weights` adds rows for other checkpoints (e.g. the model before this one).

    .venv/bin/python benchmarks/caption_folder.py [--images 128] [--batch-size 32] [--beam-size 3]
        [--weights OTHER.safetensors ...]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.images import load_image, preprocess
from captioner.inference import Captioner
from captioner.options import DecodeOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def make_folder(folder, n):
    sources = sorted(EXAMPLES.glob("*.jpg"))
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("RGB").resize((1600, 1200))
        img.save(folder / f"photo_{i:04d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def naive_loop(captioner, paths, options):
    for p in paths:
        img = Image.open(p).convert("RGB")  # full-size decode, no EXIF/mode handling
        captioner.caption_pixels(preprocess(img).unsqueeze(0), options)


def pipeline(captioner, paths, options, batch_size, workers):
    t0 = time.perf_counter()
    for _ in captioner.caption_files(paths, options, batch_size=batch_size, num_workers=workers):
        pass
    return len(paths) / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", nargs="*", default=[], help="other checkpoints to time too")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(device=args.device)
    grounded = DecodeOptions(beam_size=args.beam_size)
    plain = grounded.replace(grounding=False)
    print(f"device {captioner.device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"{args.images} images of 1600x1200, beam {args.beam_size}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(Path(tmp), args.images)
        captioner.caption(load_image(paths[0]))  # warm-up
        t0 = time.perf_counter()
        naive_loop(captioner, paths, grounded)
        naive = len(paths) / (time.perf_counter() - t0)
        fast = pipeline(captioner, paths, grounded, args.batch_size, args.workers)
        fast_plain = pipeline(captioner, paths, plain, args.batch_size, args.workers)
        others = []
        for weights in args.weights:
            other = Captioner.from_pretrained(weights, device=args.device)
            other.caption(load_image(paths[0]))
            others.append((weights, pipeline(other, paths, plain, args.batch_size, args.workers),
                           pipeline(other, paths, grounded, args.batch_size, args.workers)))
    print(f"naive per-image loop          : {naive:7.1f} images/s (grounded)")
    print(f"captioner pipeline, grounded  : {fast:7.1f} images/s (batch {args.batch_size})")
    print(f"captioner pipeline, no ground : {fast_plain:7.1f} images/s")
    print(f"speed-up (grounded vs naive)  : {fast / naive:7.2f}x")
    print(f"grounded / not grounded       : {fast / fast_plain:7.2f}")
    for weights, rate_plain, rate_grounded in others:
        print(f"{weights}: {rate_plain:.1f} images/s without grounding, {rate_grounded:.1f} with "
              f"(shipped model grounded / this one without: {fast / rate_plain:.2f})")


if __name__ == "__main__":
    main()
