"""The encoders a model can be trained with (`captioner train --encoder`), side by side:
ImageNet top-1 on the ImageNet sample (1,000 photos, one per class, through the captioner's
own 224x224 preprocessing) and the encoder's time per image (torch fp32, batches of 32, the
process's threads), each against EfficientNet-Lite0's from the same run.

    .venv/bin/python benchmarks/encoders.py [--data ../shared/data] [--batch-size 32]
"""
import argparse
import csv
import time
from pathlib import Path

import torch

from captioner.encoder import load_encoder
from captioner.images import load_image, preprocess
from captioner.options import DEFAULT_ENCODER, ENCODERS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    root = args.data / "imagenet-sample"
    with open(root / "labels.tsv", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f, delimiter="\t"), key=lambda r: r["wnid"])  # the logits' class order
    pixels = torch.stack([preprocess(load_image(root / "images" / r["file"])) for r in rows])  # (N, 3, 224, 224)
    labels = torch.arange(len(rows))

    results = {}
    for name in ENCODERS:
        encoder = load_encoder(name)
        with torch.inference_mode():
            encoder.classify(pixels[:args.batch_size])  # warm-up
            correct, seconds = 0, 0.0
            for start in range(0, len(pixels), args.batch_size):
                batch = pixels[start:start + args.batch_size]
                t0 = time.perf_counter()
                logits = encoder.classify(batch)
                seconds += time.perf_counter() - t0
                correct += (logits.argmax(1) == labels[start:start + args.batch_size]).sum().item()
        results[name] = (correct / len(pixels), seconds / len(pixels) * 1000)

    base_ms = results[DEFAULT_ENCODER][1]
    print(f"{len(pixels)} ImageNet-sample photos at 224x224, torch fp32, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    for name, (top1, ms) in results.items():
        print(f"{name:20s}: top-1 {top1:.3f}, {ms:5.1f} ms per image ({ms / base_ms:.2f}x {DEFAULT_ENCODER})")


if __name__ == "__main__":
    main()
