"""`captioner calibrate`: fit a model's person detector and caption confidence
(evidence.py) on captioned photos, and write them into a copy of its checkpoint.

1. The person detector: a logistic regression on the pooled feature. Positives and their
   weight come from the train split's captions (the share of a photo's captions that name
   a person); `no_people` photos add the scenes without anyone that captioned data lacks.
2. The confidence: the model (with its new detector) captions the validation split and the
   `also` sets as users get captions (default DecodeOptions); a logistic regression of
   "the caption names nothing absent" (CHAIR against the references) on caption_signals.
"""
import logging
from pathlib import Path

import torch

from .chair import chair, mentioned_objects
from .checkpoint import load_model, save_checkpoint
from .data import read_dataset
from .evidence import Calibration, PersonHead, auroc, caption_signals, fit_logistic, reliability
from .features import compute_features
from .images import find_images
from .inference import decode_features, resolve_device
from .machine import DEFAULT_CACHE_DIR
from .options import DEFAULT_BACKEND, DEFAULT_DEVICE, DecodeOptions

log = logging.getLogger(__name__)
# L2 penalties of the two regressions on standardised inputs: the detector has 1280 inputs
# and must transfer to photos unlike its training ones, the confidence has six.
PERSON_WEIGHT_DECAY = 3e-2
CONFIDENCE_WEIGHT_DECAY = 1e-3


def calibrate_checkpoint(checkpoint, config, device=DEFAULT_DEVICE, workers=None, backend=DEFAULT_BACKEND):
    """Fit, save to config.out and report: {"person_head": {...}, "confidence": {...}}."""
    device = resolve_device(device)
    model, vocab, info = load_model(checkpoint)
    model.to(device)
    records = read_dataset(config.data, config.format, config.images, val_fraction=config.val_fraction,
                           split_file=config.split_file)
    train = [r for r in records if r.split == "train"]
    dev = [r for r in records if r.split == "val"] + [r for path in config.also for r in read_dataset(path)]
    if not train or not dev:
        raise ValueError(f"{config.data}: calibrate needs a train and a validation split")

    def features_of(paths):
        """-> (the readable photos' features and, for an attention model, maps (else None), on
        `device`; ok per path). An attention model's photos are read from the store's entries
        with maps, which hold the pooled feature too: one encoding serves both."""
        spatial = model.config.attention
        found = compute_features(model, paths, device, config.cache_dir or DEFAULT_CACHE_DIR, num_workers=workers,
                                 backend=backend, spatial=spatial)
        ok = torch.tensor(found[-1], dtype=torch.bool)
        maps = found[1][ok].to(device) if spatial else None
        return found[0][ok].to(device), maps, found[-1]

    report = {"person_head": fit_person_head(model, train, no_people_photos(config.no_people), features_of)}
    dev_features, dev_maps, ok = features_of([r.image for r in dev])
    dev = [r for r, good in zip(dev, ok, strict=True) if good]
    report["confidence"] = fit_confidence(model, vocab, dev, dev_features, config, dev_maps)
    info = {**info, "calibrated_on": {"data": str(config.data), "no_people": config.no_people,
                                      "also": list(config.also)}}
    save_checkpoint(config.out, model, vocab, info)
    return report


def no_people_photos(source):
    """The photos of --no-people: a folder's images, or the paths a list file names
    (relative to the list's folder)."""
    if not source:
        return []
    source = Path(source)
    if source.is_dir():
        return find_images([source], recursive=True)
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [source.parent / line for line in lines]


def fit_person_head(model, train, no_people, features_of):
    """Fit model.person_head; -> what it was fitted on and its fit AUROC."""
    feats, _, ok = features_of([r.image for r in train])
    people = torch.tensor([sum("person" in mentioned_objects(c) for c in r.captions) / max(1, len(r.captions))
                           for r, good in zip(train, ok, strict=True) if good])
    x, y = [feats], [people]
    if no_people:
        empty, _, _ = features_of(no_people)
        x.append(empty)
        y.append(torch.zeros(len(empty)))
    x, y = torch.cat(x).cpu(), torch.cat(y)
    weight, bias = fit_logistic(x, y, weight_decay=PERSON_WEIGHT_DECAY)
    head = PersonHead(x.size(1))
    with torch.no_grad():
        head.linear.weight.copy_(weight.unsqueeze(0))
        head.linear.bias.fill_(bias)
    model.person_head = head.to(feats.device)
    with torch.inference_mode():
        fitted = head(x).tolist()
    log.info("person detector: %d captioned photos (%.0f%% with people) and %d without anyone", len(people),
             100 * float((people >= 0.5).float().mean()), len(x) - len(people))
    return {"photos": len(people), "no_people": len(x) - len(people), "fit_auroc": auroc(fitted, (y >= 0.5).tolist())}


def fit_confidence(model, vocab, dev, features, config, maps=None):
    """Fit model.calibration on the dev records' captions (features and, for an attention
    model, maps); -> its fit AUROC and reliability."""
    decode = DecodeOptions()
    model.calibration = None
    results, signals = [], []
    with torch.inference_mode():
        for s in range(0, len(features), config.batch_size):
            chunk = features[s:s + config.batch_size]
            spatial = maps[s:s + config.batch_size].float() if maps is not None else None
            results += decode_features(model, vocab, chunk, decode, spatial)
            concept_p = model.concepts.concept_probs(model.classify_features(chunk)).cpu()
            person_p = model.person_head(chunk).cpu()
            signals += [caption_signals(r["caption"], r["score"], concept_p[i], person_p[i], model.concepts)
                        for i, r in enumerate(results[s:])]
    found = chair({i: r["caption"] for i, r in enumerate(results)}, {i: r.captions for i, r in enumerate(dev)})
    truthful = [not found["per_image"][i] for i in range(len(results))]
    weight, bias = fit_logistic(signals, truthful, weight_decay=CONFIDENCE_WEIGHT_DECAY)
    fitted_on = f"{len(dev)} captioned photos: validation split of {config.data}" + \
        "".join(f", {path}" for path in config.also)
    model.calibration = Calibration(weight.tolist(), bias, fitted_on=fitted_on)
    confidence = model.calibration(signals).tolist()
    log.info("confidence fitted on %s; CHAIR-s there %.3f", fitted_on, found["CHAIR-s"])
    return {"captions": len(dev), "CHAIR-s": found["CHAIR-s"], "fit_auroc": auroc(confidence, truthful),
            "reliability": reliability(confidence, truthful), "weights": dict(zip(model.calibration.signals,
                                                                                 weight.tolist(), strict=True))}
