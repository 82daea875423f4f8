"""Folder-captioning throughput per encoder backend, against a naive per-image loop.

Everything runs on the same folder of photo-sized JPEGs (made from the bundled examples at
1600x1200, like a phone photo scaled down), same model, same beam size, in one run:

- naive: the tutorial way, and this project before encoder backends: open, convert,
  preprocess and caption one image at a time with torch fp32.
- encoder only: the backend's encoder alone on pre-decoded tensors, in batches, with
  every core.
- pipeline: what `captioner caption` runs, grounded (the default): worker processes decode
  (JPEG draft mode) while the encoder and decoder work on the previous batch.

The goals: the `auto` pipeline >= 4x the naive loop, and >= 0.8x its backend's own
encoder-only rate. `--no-grounding` adds ungrounded pipeline rows; `--weights` other models.

    .venv/bin/python benchmarks/caption_folder.py [--images 256] [--batch-size 32] [--beam-size 3]
        [--backends auto torch torch-bf16 onnx onnx-int8] [--naive-images 64] [--weights OTHER ...]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.backends import available_cores
from captioner.images import load_image, preprocess
from captioner.inference import Captioner, file_captioner
from captioner.options import BACKENDS, DecodeOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def make_folder(folder, n):
    sources = sorted(EXAMPLES.glob("*.jpg"))
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("RGB").resize((1600, 1200))
        img.save(folder / f"photo_{i:04d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def naive_loop(captioner, paths, options):
    t0 = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB")  # full-size decode, no EXIF/mode handling
        captioner.caption_pixels(preprocess(img).unsqueeze(0), options)
    return len(paths) / (time.perf_counter() - t0)


def encoder_only(captioner, pixels, batch_size):
    captioner.encode_images(pixels[:batch_size])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(pixels), batch_size):
        captioner.encode_images(pixels[s:s + batch_size])
    return len(pixels) / (time.perf_counter() - t0)


def pipeline(captioner, paths, options, batch_size, workers):
    t0 = time.perf_counter()
    for _ in captioner.caption_files(paths, options, batch_size=batch_size, num_workers=workers):
        pass
    return len(paths) / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--naive-images", type=int, default=64, help="the naive loop is slow: time fewer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--no-grounding", action="store_true", help="also time pipelines without grounding")
    parser.add_argument("--weights", nargs="*", default=[], help="other checkpoints to time too (auto backend)")
    args = parser.parse_args()
    grounded = DecodeOptions(beam_size=args.beam_size)
    plain = grounded.replace(grounding=False)
    print(f"torch threads {torch.get_num_threads()}, cores {available_cores()} (os.cpu_count {os.cpu_count()}), "
          f"{args.images} JPEGs of 1600x1200, beam {args.beam_size}, batch {args.batch_size}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_folder(Path(tmp), args.images)
        pixels = torch.stack([preprocess(load_image(p)) for p in paths])
        reference = Captioner.from_pretrained(device="cpu", backend="torch")
        reference.caption(load_image(paths[0]))  # warm-up
        naive = naive_loop(reference, paths[:args.naive_images], grounded)
        print(f"naive per-image loop (torch fp32, grounded): {naive:.1f} images/s", flush=True)
        cores = available_cores()
        for backend in args.backends:
            torch.set_num_threads(cores)  # the encoder alone gets every core
            enc = encoder_only(Captioner.from_pretrained(device="cpu", backend=backend, threads=cores), pixels,
                               args.batch_size)
            captioner = file_captioner(device="cpu", backend=backend)  # the CLI's thread split
            captioner.caption(load_image(paths[0]))
            name = f"{backend} ({captioner.backend})" if backend == "auto" else backend
            rate = pipeline(captioner, paths, grounded, args.batch_size, args.workers)
            rows.append((name, enc, rate, pipeline(captioner, paths, plain, args.batch_size, args.workers)
                         if args.no_grounding else None))
            print(f"{name}: encoder only {enc:.1f}, pipeline {rate:.1f} images/s", flush=True)
        others = []
        for weights in args.weights:
            other = file_captioner(weights, device="cpu")
            other.caption(load_image(paths[0]))
            others.append((weights, pipeline(other, paths, plain, args.batch_size, args.workers)))
    print()
    print("| backend | encoder only, images/s | pipeline, images/s | pipeline / encoder only | pipeline / naive |"
          + (" pipeline without grounding |" if args.no_grounding else ""))
    print("|---|---|---|---|---|" + ("---|" if args.no_grounding else ""))
    for name, enc, rate, rate_plain in rows:
        print(f"| {name} | {enc:.1f} | {rate:.1f} | {rate / enc:.2f} | {rate / naive:.2f} |"
              + (f" {rate_plain:.1f} |" if rate_plain else ""))
    print(f"| naive loop (torch fp32) | | {naive:.1f} | | 1.00 |")
    for weights, rate in others:
        print(f"{weights}: {rate:.1f} images/s without grounding")


if __name__ == "__main__":
    main()
