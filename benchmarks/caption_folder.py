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
encoder-only rate. `--no-grounding` adds ungrounded pipeline rows, `--without-evidence`
pipeline rows with the decoding levers of evidence.py off (no repeat blocks, no negative
evidence, no person detector: what their cost is measured against); `--weights` other models
(the auto backend's grounded pipeline, e.g. a pooled model against the attention default).

`--stages` adds, per backend, the CPU time per image of each stage the pipeline runs:
reading + preprocessing the JPEGs (`load_image`, `preprocess`), the encoder on pre-decoded
tensors, and the beam search (decode_features) on precomputed features, grounded and not,
each on one thread and with the pipeline's threads. The cores can do no more than
cores / (read + encoder + beam search) CPU-seconds per image: that bounds the pipeline, and
divided by the encoder-only rate, the pipeline / encoder-only ratio. `--timeline` times every
encoder and beam-search call of one more pipeline run per backend: how long the pipeline
takes to fill (no beam search before the first batch is read and encoded) and to drain (no
encoder work beside the last beam search), and how busy each stage is in between.
`--beam-batches 1 4 8 32` times the beam search alone on one thread in batches of each size
(on 64 of the photos): what the small micro-batches of a server cost per image.

    .venv/bin/python benchmarks/caption_folder.py [--images 256] [--batch-size 32] [--beam-size 3]
        [--backends auto torch torch-bf16 onnx onnx-int8] [--naive-images 64] [--weights OTHER ...] [--stages]
        [--no-grounding] [--without-evidence] [--timeline] [--beam-batches 1 4 8 32]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from captioner.backends import resolve_backend
from captioner.machine import available_cores, pipeline_threads
from captioner.images import load_image, preprocess
from captioner.inference import Captioner, decode_features, file_captioner
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
    """-> (images/s, CPU ms per image) of the encoder alone, in batches."""
    captioner.encode_images(pixels[:batch_size])  # warm-up
    rate, cpu_ms, _ = timed(lambda: [captioner.encode_images(pixels[s:s + batch_size])
                                     for s in range(0, len(pixels), batch_size)], len(pixels))
    return rate, cpu_ms


def timed(fn, n):
    """Run fn() on n images -> (images/s, CPU ms per image, what fn returned). CPU time is
    this process's, all of its threads: what the stage takes from the cores."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n, out


def decode_only(captioner, encoded, options, batch_size):
    """-> (images/s, CPU ms per image) of the beam search on precomputed (features, maps)."""
    features, maps = encoded

    def run():
        with torch.inference_mode():
            for s in range(0, len(features), batch_size):
                decode_features(captioner.model, captioner.vocab, features[s:s + batch_size], options,
                                maps[s:s + batch_size])
    decode_features(captioner.model, captioner.vocab, features[:batch_size], options, maps[:batch_size])  # warm-up
    rate, cpu_ms, _ = timed(run, len(features))
    return rate, cpu_ms


def stages(backend, paths, pixels, grounded, plain, batch_size):
    """CPU ms per image of the pipeline's stages, {stage: (one thread, pipeline threads)},
    and the pipeline's encoder threads. Reading runs in DataLoader workers, which torch
    gives one thread; the encoder and the beam search as file_captioner sets them up."""
    threads = pipeline_threads(resolve_backend(backend, torch.device("cpu")))
    found = {}
    for n_threads in (1, threads):
        torch.set_num_threads(n_threads)
        captioner = Captioner.from_pretrained(device="cpu", backend=backend, threads=n_threads)
        _, read, _ = timed(lambda: [preprocess(load_image(p)) for p in paths], len(paths))
        _, encode = encoder_only(captioner, pixels, batch_size)
        features = captioner.encode_images(pixels)
        for stage, ms in (("read + preprocess", read), ("encoder", encode),
                          ("beam search, grounded", decode_only(captioner, features, grounded, batch_size)[1]),
                          ("beam search, no grounding", decode_only(captioner, features, plain, batch_size)[1])):
            found.setdefault(stage, []).append(ms)
    return found, threads


def pipeline(captioner, paths, options, batch_size, workers):
    t0 = time.perf_counter()
    for _ in captioner.caption_files(paths, options, batch_size=batch_size, num_workers=workers):
        pass
    return len(paths) / (time.perf_counter() - t0)


def timeline(captioner, paths, options, batch_size, workers):
    """One pipeline run with every encoder and beam-search call timed, to show where the
    cores wait: before the first beam search (the first batch is read and encoded: the fill),
    after the last encoder call (the last beam search: the drain), and in between. -> text."""
    calls = []  # (stage, start, end), seconds from the start

    def recorded(stage, call):
        def wrapper(*args, **kwargs):
            start = time.perf_counter() - t0
            try:
                return call(*args, **kwargs)
            finally:
                calls.append((stage, start, time.perf_counter() - t0))
        return wrapper

    captioner.encode_images = recorded("encoder", captioner.encode_images)  # instance attributes hide the methods
    captioner._decode = recorded("beam search", captioner._decode)
    try:
        t0 = time.perf_counter()
        for _ in captioner.caption_files(paths, options, batch_size=batch_size, num_workers=workers):
            pass
        wall = time.perf_counter() - t0
    finally:
        del captioner.encode_images, captioner._decode
    encoder = [(a, b) for stage, a, b in calls if stage == "encoder"]
    beam = [(a, b) for stage, a, b in calls if stage == "beam search"]
    first_beam, last_encoder = min(a for a, _ in beam), max(b for _, b in encoder)
    encoder_busy, beam_busy = sum(b - a for a, b in encoder), sum(b - a for a, b in beam)
    # The encoder thread's share of the steady part, where both stages have work.
    steady = sum(min(b, last_encoder) - max(a, first_beam) for a, b in encoder if b > first_beam)
    return (f"\ntimeline of one {captioner.backend} pipeline run ({len(paths)} images, {wall:.2f} s): "
            f"first encoder call at {min(a for a, _ in encoder):.2f} s (reading the first batch), "
            f"first beam search at {first_beam:.2f} s (fill), last encoder call done at {last_encoder:.2f} s, "
            f"drain {wall - last_encoder:.2f} s\n"
            f"  encoder thread busy {encoder_busy:.2f} s = {encoder_busy / wall:.2f} of the run; beam-search "
            f"threads busy {beam_busy:.2f} s = {beam_busy / wall:.2f}; between the fill and the drain the "
            f"encoder thread is busy {steady / (last_encoder - first_beam):.2f} of the time")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--naive-images", type=int, default=64, help="the naive loop is slow: time fewer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--no-grounding", action="store_true", help="also time pipelines without grounding")
    parser.add_argument("--without-evidence", action="store_true",
                        help="also time pipelines with repeat blocks, negative evidence and the person detector off")
    parser.add_argument("--weights", nargs="*", default=[], help="other checkpoints to time too (auto backend)")
    parser.add_argument("--beam-batches", type=int, nargs="*", default=[],
                        help="also time the grounded beam search alone, one thread, in batches of these sizes "
                             "(e.g. 1 4 8 32: what a server's small micro-batches cost)")
    parser.add_argument("--timeline", action="store_true",
                        help="also time every encoder and beam-search call of one auto pipeline run: fill, drain, busy")
    parser.add_argument("--stages", action="store_true",
                        help="also time each stage alone (CPU per image) and print the bound it implies")
    args = parser.parse_args()
    grounded = DecodeOptions(beam_size=args.beam_size)
    plain = grounded.replace(grounding=False)
    no_evidence = grounded.replace(block_repeats=False, absent_threshold=0.0, person_threshold=0.0)
    print(f"torch threads {torch.get_num_threads()}, cores {available_cores()} (os.cpu_count {os.cpu_count()}), "
          f"{args.images} JPEGs of 1600x1200, beam {args.beam_size}, batch {args.batch_size}")
    rows, per_stage, timelines = [], [], []
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
            enc, enc_cpu = encoder_only(Captioner.from_pretrained(device="cpu", backend=backend, threads=cores),
                                        pixels, args.batch_size)
            captioner = file_captioner(device="cpu", backend=backend)  # the CLI's thread split
            captioner.caption(load_image(paths[0]))
            name = f"{backend} ({captioner.backend})" if backend == "auto" else backend
            rate = pipeline(captioner, paths, grounded, args.batch_size, args.workers)
            rows.append((name, enc, rate, pipeline(captioner, paths, plain, args.batch_size, args.workers)
                         if args.no_grounding else None,
                         pipeline(captioner, paths, no_evidence, args.batch_size, args.workers)
                         if args.without_evidence else None))
            print(f"{name}: encoder only {enc:.1f}, pipeline {rate:.1f} images/s", flush=True)
            if args.timeline:
                timelines.append(timeline(captioner, paths, grounded, args.batch_size, args.workers))
            if args.stages:
                per_stage.append((name, enc, enc_cpu, rate, *stages(backend, paths, pixels, grounded, plain,
                                                                    args.batch_size)))
        beam_batches = []
        if args.beam_batches:
            torch.set_num_threads(1)
            one_thread = Captioner.from_pretrained(device="cpu", threads=1)
            encoded = one_thread.encode_images(pixels[:64])
            beam_batches = [(size, decode_only(one_thread, encoded, grounded, size)[1]) for size in args.beam_batches]
            torch.set_num_threads(cores)
        others = []
        for weights in args.weights:
            other = file_captioner(weights, device="cpu")
            other.caption(load_image(paths[0]))
            others.append((weights, pipeline(other, paths, grounded, args.batch_size, args.workers)))
    print()
    print("| backend | encoder only, images/s | pipeline, images/s | pipeline / encoder only | pipeline / naive |"
          + (" pipeline without grounding |" if args.no_grounding else "")
          + (" pipeline without evidence levers | with / without |" if args.without_evidence else ""))
    print("|---|---|---|---|---|" + ("---|" if args.no_grounding else "")
          + ("---|---|" if args.without_evidence else ""))
    for name, enc, rate, rate_plain, rate_off in rows:
        print(f"| {name} | {enc:.1f} | {rate:.1f} | {rate / enc:.2f} | {rate / naive:.2f} |"
              + (f" {rate_plain:.1f} |" if rate_plain else "") + (f" {rate_off:.1f} | {rate / rate_off:.2f} |"
                                                                  if rate_off else ""))
    print(f"| naive loop (torch fp32) | | {naive:.1f} | | 1.00 |")
    for weights, rate in others:
        print(f"{weights} (auto backend, grounded pipeline): {rate:.1f} images/s")
    for name, enc, enc_cpu, rate, found, threads in per_stage:
        print_stages(name, enc, enc_cpu, rate, found, threads, available_cores())
    for text in timelines:
        print(text)
    if beam_batches:
        print("\nbeam search alone, grounded, one thread, CPU ms per image by batch size: "
              + ", ".join(f"{size}: {ms:.1f}" for size, ms in beam_batches))


def print_stages(name, enc, enc_cpu, rate, found, threads, cores):
    """The stage table of one backend and the bounds it implies (with the pipeline's threads)."""
    print(f"\n{name}: CPU ms per image (all threads of the process), {cores} cores")
    print(f"| stage | 1 thread | pipeline's threads ({threads}) |")
    print("|---|---|---|")
    for stage, (one, pipe) in found.items():
        print(f"| {stage} | {one:.2f} | {pipe:.2f} |")
    print(f"| encoder only ({cores} threads, as in the table above) | | {enc_cpu:.2f} |")
    bounds = {}
    for kind in ("grounded", "no grounding"):
        total = found["read + preprocess"][1] + found["encoder"][1] + found[f"beam search, {kind}"][1]
        bound = bounds[kind] = 1000 * cores / total
        print(f"{kind}: read + encoder + beam search = {total:.2f} ms -> pipeline <= {cores} cores / {total:.2f} ms "
              f"= {bound:.1f} images/s = {bound / enc:.2f} of encoder only ({enc:.1f} images/s); "
              f"encoder / sum = {found['encoder'][1] / total:.2f}")
    print(f"measured: pipeline grounded {rate:.1f} images/s, {rate / enc:.2f} of encoder only, "
          f"{rate / bounds['grounded']:.2f} of its bound")

if __name__ == "__main__":
    main()
