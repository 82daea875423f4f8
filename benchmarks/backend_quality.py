"""Caption quality of each encoder backend against torch fp32, on one split, in one run.

For every backend: BLEU-4, METEOR and CIDEr (coco-caption scorer, PTB tokenizer, beam 3,
grounded, the shipped weights), CIDEr as a ratio of fp32's, the share of captions
identical to fp32's, and the captioning rate. The ratios fix `backends.CIDER_VS_FP32`,
which `auto` reads: a backend more than 1% below fp32 is never picked.

    .venv/bin/python benchmarks/backend_quality.py [--data ../shared/data/flickr8k] [--split test]
        [--backends torch torch-bf16 onnx onnx-int8] [--weights W] [--output runs/backend-quality.json]
"""
import argparse
import json
from pathlib import Path

from captioner.evaluate import evaluate_checkpoint
from captioner.inference import DEFAULT_WEIGHTS
from captioner.options import EvalConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/flickr8k")
    parser.add_argument("--split", default="test")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--backends", nargs="+", default=["torch", "torch-bf16", "onnx", "onnx-int8"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for every backend's report")
    args = parser.parse_args()
    config = EvalConfig(data=args.data, split=args.split)
    reports = {b: evaluate_checkpoint(args.weights, config, backend=b, workers=args.workers)
               for b in dict.fromkeys(["torch", *args.backends])}
    ref = reports["torch"]
    ref_captions = {c["image"]: c["caption"] for c in ref["captions"]}
    print(f"{args.data} split {args.split}, {ref['images']} images, beam {ref['decode']['beam_size']}, "
          f"grounding {ref['decode']['grounding']}, tokenizer {ref['scores']['tokenizer']}")
    print("| backend | BLEU-4 | METEOR | CIDEr | CIDEr vs fp32 | same caption as fp32 | images/s |")
    print("|---|---|---|---|---|---|---|")
    for backend, r in reports.items():
        s = r["scores"]
        same = sum(ref_captions.get(c["image"]) == c["caption"] for c in r["captions"]) / len(r["captions"])
        print(f"| {backend} | {s['BLEU-4']:.3f} | {s.get('METEOR', float('nan')):.3f} | {s['CIDEr']:.3f} | "
              f"{s['CIDEr'] / ref['scores']['CIDEr']:.3f} | {same:.3f} | {r['images'] / r['caption_seconds']:.1f} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
