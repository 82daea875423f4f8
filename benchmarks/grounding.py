"""Open-world quality on the dev sets, and the sweep that chose the grounding thresholds.

For each checkpoint, each image is encoded once (the feature cache of `captioner train`),
then decoded with every setting:
  - coco-dev: 80 everyday COCO photos with 5 captions each -> CIDEr and BLEU-4,
  - imagenet-sample: 1000 photos, one per ImageNet class -> the share of the photos whose
    class maps to a caption word (shipped concept map) whose caption names it,
  - Flickr8k dev: 1000 photos -> CIDEr (the in-domain cost of grounding).
Scores use the fast tokenizer (no Java) so that a sweep takes a minute; the figures the
model card reports come from `captioner evaluate` (coco-caption scorer, PTB, METEOR).

    .venv/bin/python benchmarks/grounding.py [--weights W ...] [--thresholds 0.3,0.5,0.7]
        [--max-concepts 1,2] [--data ../shared/data]
"""
import argparse
import csv
import json
from pathlib import Path

import torch

from captioner.concepts import shipped_concepts
from captioner.data import read_dataset
from captioner.inference import Captioner, decode_features
from captioner.metrics import score_captions
from captioner.options import DecodeOptions
from captioner.features import compute_features
from captioner.vocab import tokenize


def load_sets(root):
    root = Path(root)
    coco = read_dataset(root / "coco-dev" / "captions_train2017.json")
    flickr = [r for r in read_dataset(root / "flickr8k") if r.split == "val"]
    with open(root / "imagenet-sample" / "labels.tsv", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f, delimiter="\t"), key=lambda r: r["wnid"])  # standard class order
    concepts = shipped_concepts()
    imagenet = [(root / "imagenet-sample" / "images" / r["file"], set(concepts.words[concepts.class_concept[k]]))
                for k, r in enumerate(rows) if concepts.class_concept[k] >= 0]
    return coco, flickr, imagenet


def caption_all(captioner, encoded, options, batch_size=250):
    features, maps = encoded
    out = []
    for s in range(0, len(features), batch_size):
        spatial = maps[s:s + batch_size].float().to(captioner.device) if maps is not None else None
        out += decode_features(captioner.model, captioner.vocab, features[s:s + batch_size].to(captioner.device),
                               options, spatial)
    return out


def encoded(model, paths, device, spatial):
    """-> (features, maps or None) of `paths` from the feature store."""
    found = compute_features(model, paths, device, num_workers=1, backend="torch", spatial=spatial)
    return found[0], found[1] if spatial else None


def scores(records, results):
    predictions = {str(r.image): res["caption"] for r, res in zip(records, results, strict=True)}
    return score_captions(predictions, {str(r.image): r.captions for r in records}, use_java=False, cider_only=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="*", default=[None], help="checkpoints (default: the shipped one)")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--max-concepts", default="1,2")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args()
    coco, flickr, imagenet = load_sets(args.data)
    settings = [DecodeOptions(beam_size=args.beam_size, grounding=False)] + [
        DecodeOptions(beam_size=args.beam_size, concept_threshold=float(t), max_concepts=int(m))
        for m in args.max_concepts.split(",") for t in args.thresholds.split(",")]
    rows = []
    print(f"{'weights':28s} {'grounding':>18s} | coco-dev CIDEr BLEU-4 | imagenet named | flickr-dev CIDEr")
    for weights in args.weights:
        captioner = Captioner.from_pretrained(weights, device="cpu", backend="torch")
        # fp32 features: the thresholds were chosen on them, and the backends are judged against them
        attention = captioner.model.config.attention
        feats = {name: encoded(captioner.model, paths, captioner.device, attention)
                 for name, paths in (("coco", [r.image for r in coco]), ("flickr", [r.image for r in flickr]),
                                     ("imagenet", [p for p, _ in imagenet]))}
        for options in settings:
            with torch.inference_mode():
                c = scores(coco, caption_all(captioner, feats["coco"], options))
                f = scores(flickr, caption_all(captioner, feats["flickr"], options))
                named = [bool(words & set(tokenize(r["caption"])))
                         for (_, words), r in zip(imagenet, caption_all(captioner, feats["imagenet"], options),
                                                  strict=True)]
            label = f"t={options.concept_threshold} m={options.max_concepts}" if options.grounding else "off"
            row = {"weights": str(weights or "shipped"), "grounding": label, "coco_CIDEr": round(c["CIDEr"], 4),
                   "coco_BLEU-4": round(c["BLEU-4"], 4), "imagenet_named": round(sum(named) / len(named), 4),
                   "flickr_dev_CIDEr": round(f["CIDEr"], 4)}
            rows.append(row)
            print(f"{row['weights'][-28:]:28s} {label:>18s} | {c['CIDEr']:14.3f} {c['BLEU-4']:6.3f} | "
                  f"{row['imagenet_named']:14.3f} | {f['CIDEr']:16.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
