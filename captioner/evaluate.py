"""`captioner evaluate`: caption one split of a dataset and score it with coco-caption."""
import time

from .data import normalise_split, read_dataset
from .inference import file_captioner
from .metrics import score_captions
from .options import DEFAULT_BACKEND, DecodeOptions


def evaluate_checkpoint(checkpoint, config, decode=None, device="auto", workers=None, backend=DEFAULT_BACKEND):
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
    predictions, objects, failed = {}, {}, {}
    t0 = time.time()
    paths = [r.image for r in records]
    with tqdm(total=len(records), desc=f"captioning {split}", unit="img") as bar:
        for i, result, error in captioner.caption_files(paths, decode, config.batch_size, workers):
            if error is not None:
                failed[str(paths[i])] = error
            else:
                predictions[str(paths[i])] = result["caption"]
                objects[str(paths[i])] = result["objects"]
            bar.update()
    elapsed = time.time() - t0
    references = {str(r.image): r.captions for r in records if str(r.image) in predictions}
    scores = score_captions(predictions, references)
    return {
        "checkpoint": str(checkpoint), "data": str(config.data), "split": split, "backend": captioner.backend,
        "decode": decode.to_dict(),
        "images": len(predictions), "failed": failed, "caption_seconds": round(elapsed, 1),
        "scores": scores,
        "captions": [{"image": k, "caption": v, "objects": objects[k], "references": references[k]}
                     for k, v in predictions.items()],
    }
