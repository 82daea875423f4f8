"""Hallucination and confidence, side by side on Flickr8k dev and test and on coco-dev.

For each checkpoint, `captioner evaluate` (coco-caption scorer, beam 3, the default
decoding) on the three sets: CIDEr, BLEU-4, METEOR, CHAIR-s, CHAIR-i, the share of captions
with a repeated word or trigram, the objects most often invented, and how well
`confidence` separates the captions that name nothing absent (AUROC). With --ablate, each
of the decoding levers of evidence.py is added in turn: plain beam search, + no repeats,
+ negative evidence from the classifier, + the person detector (the default).

    .venv/bin/python benchmarks/hallucination.py [--weights W ...] [--data DIR] [--ablate]

DIR holds flickr8k/ and coco-dev/ (the layouts of docs/training.md).
"""
import argparse
import logging
from pathlib import Path

from captioner.evaluate import evaluate_checkpoint
from captioner.inference import DEFAULT_WEIGHTS
from captioner.options import DecodeOptions, EvalConfig

LEVERS = [
    ("plain", dict(block_repeats=False, absent_threshold=0.0, person_threshold=0.0)),
    ("+ no repeats", dict(absent_threshold=0.0, person_threshold=0.0)),
    ("+ negative evidence", dict(person_threshold=0.0)),
    ("+ person detector", {}),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="+", default=[str(DEFAULT_WEIGHTS)])
    parser.add_argument("--data", default="data", help="folder with flickr8k/ and coco-dev/")
    parser.add_argument("--ablate", action="store_true", help="add the decoding levers one at a time")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.data)
    sets = [("Flickr8k dev", EvalConfig(data=str(root / "flickr8k"), split="val")),
            ("Flickr8k test", EvalConfig(data=str(root / "flickr8k"), split="test")),
            ("coco-dev", EvalConfig(data=str(root / "coco-dev" / "captions_train2017.json"), split="all"))]
    levers = LEVERS if args.ablate else LEVERS[-1:]
    print(f"{'weights':28s} {'decoding':20s} {'set':14s} {'CIDEr':>6s} {'BLEU-4':>6s} {'METEOR':>6s} "
          f"{'CHAIR-s':>7s} {'CHAIR-i':>7s} {'repeats':>7s} {'AUROC':>6s}  most invented")
    for weights in args.weights:
        for lever, changes in levers:
            for name, config in sets:
                report = evaluate_checkpoint(weights, config, DecodeOptions(**changes), backend=args.backend)
                s, h = report["scores"], report["hallucination"]
                auroc = h.get("confidence_auroc")
                print(f"{Path(weights).name[:28]:28s} {lever:20s} {name:14s} {s['CIDEr']:6.3f} {s['BLEU-4']:6.3f} "
                      f"{s.get('METEOR', float('nan')):6.3f} {h['CHAIR-s']:7.3f} {h['CHAIR-i']:7.3f} "
                      f"{h['repeats']:7.3f} {auroc if auroc is None else round(auroc, 3)!s:>6s}  "
                      + ", ".join(f"{obj} {n}" for obj, n in h["hallucinated"][:4]), flush=True)
                if lever == levers[-1][0] and "reliability" in h:
                    for row in h["reliability"]:
                        print(f"{'':64s}confidence {row['low']:.1f}-{row['high']:.1f}: {row['captions']:4d} "
                              f"captions, mean {row['confidence']:.3f}, truthful {row['truthful']:.3f}")


if __name__ == "__main__":
    main()
