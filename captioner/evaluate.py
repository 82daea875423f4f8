"""`captioner evaluate`: caption one split of a dataset and score it with coco-caption,
and for hallucination with CHAIR (chair.py), and how well `confidence` tells the captions
that name nothing absent from the rest."""
import time

from .chair import chair
from .data import normalise_split, read_dataset
from .evidence import auroc, reliability
from .inference import file_captioner
from .metrics import score_captions
from .options import DEFAULT_BACKEND, DEFAULT_DEVICE, DecodeOptions


def evaluate_checkpoint(checkpoint, config, decode=None, device=DEFAULT_DEVICE, workers=None, backend=DEFAULT_BACKEND):
    """-> {"checkpoint", "data", "split", "decode", "images", "scores", "captions"}: the
    images of `config` (an EvalConfig) captioned with `decode` (a DecodeOptions; n_best is
    1) by `workers` image-decoding processes. Unreadable images are reported, not scored."""
    from tqdm import tqdm

    split = "all" if config.split == "all" else normalise_split(config.split)  # "all": a set only for scoring
    captioner = file_captioner(checkpoint, device=device, backend=backend)
    records = [r for r in read_dataset(config.data, config.format, config.images, val_fraction=config.val_fraction,
                                       split_file=config.split_file)
               if split in ("all", r.split)]
    if not records:
        raise ValueError(f"{config.data}: no images in split {split!r}")
    decode = (decode or DecodeOptions()).replace(n_best=1)
    predictions, objects, confidences, failed = {}, {}, {}, {}
    t0 = time.time()
    paths = [r.image for r in records]
    with tqdm(total=len(records), desc=f"captioning {split}", unit="img") as bar:
        for i, result, error in captioner.caption_files(paths, decode, config.batch_size, workers):
            if error is not None:
                failed[str(paths[i])] = error
            else:
                predictions[str(paths[i])] = result["caption"]
                objects[str(paths[i])] = result["objects"]
                confidences[str(paths[i])] = result["confidence"]
            bar.update()
    elapsed = time.time() - t0
    references = {str(r.image): r.captions for r in records if str(r.image) in predictions}
    scores = score_captions(predictions, references)
    hallucination = hallucination_report(predictions, references, confidences)
    absent = hallucination.pop("per_image")
    return {
        "checkpoint": str(checkpoint), "data": str(config.data), "split": split, "backend": captioner.backend,
        "decode": decode.to_dict(),
        "images": len(predictions), "failed": failed, "caption_seconds": round(elapsed, 1),
        "scores": scores, "hallucination": hallucination,
        "captions": [{"image": k, "caption": v, "confidence": confidences[k], "objects": objects[k],
                      "hallucinated": absent[k], "references": references[k]}
                     for k, v in predictions.items()],
    }


def hallucination_report(predictions, references, confidences):
    """CHAIR of the captions ({id: caption}, {id: [references]}) and, where every caption
    has a confidence, its AUROC for "names nothing absent" and a reliability table."""
    found = chair(predictions, references)
    report = {k: found[k] for k in ("CHAIR-s", "CHAIR-i", "repeats", "captions", "mentions", "hallucinations",
                                    "per_image")}
    report["hallucinated"] = found["hallucinated"][:10]
    if confidences and all(confidences.get(k) is not None for k in predictions):
        truthful = [not found["per_image"][k] for k in predictions]
        conf = [confidences[k] for k in predictions]
        report["confidence_auroc"] = auroc(conf, truthful)
        report["reliability"] = [dict(zip(("low", "high", "captions", "confidence", "truthful"), row, strict=True))
                                 for row in reliability(conf, truthful)]
    return report
