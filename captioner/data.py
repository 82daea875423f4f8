"""Dataset readers. Every layout becomes the same list of `Record(image, captions, split)`,
with split one of "train", "val", "test" (Flickr8k's "dev" is "val").

Layouts: Flickr8k as released, Karpathy json, COCO captions json, CSV or JSONL with
`image,caption` rows, and a folder of images with a same-named .txt of captions beside each.
"""
import csv
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_EXTENSIONS
from .options import DATA_FORMATS, VAL_FRACTION

log = logging.getLogger(__name__)
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "valid": "val",
               "validation": "val", "test": "test"}


class DataError(ValueError):
    """The dataset cannot be read; the message names the file (and line) at fault."""


@dataclass
class Record:
    image: Path
    captions: list = field(default_factory=list)
    split: str = ""


def normalise_split(name):
    key = (name or "").strip().lower()
    if key not in SPLIT_NAMES:
        raise DataError(f"unknown split {name!r}: use train, val (or dev) or test")
    return SPLIT_NAMES[key]


def detect_format(path):
    path = Path(path)
    if path.is_dir():
        if (path / "Flickr8k.token.txt").is_file():
            return "flickr8k"
        if any(path.glob("dataset_*.json")):
            return "karpathy"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        if isinstance(data, dict) and "images" in data:
            return "karpathy"
        raise DataError(f"{path}: JSON is neither Karpathy (images[].sentences) nor COCO (images + annotations)")
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    raise DataError(f"{path}: cannot tell the dataset format; pass --format")


def read_dataset(path, format="auto", images=None, val_fraction=VAL_FRACTION, split_file=None):
    """Read any supported layout. `images` is the image folder where the layout does not
    fix it. Records whose image file is missing are dropped and counted in the log.
    `split_file` sets the split (apply_split_file); otherwise a set with no split gets a
    stable train/val split (assign_split)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in DATA_FORMATS[1:]:
        raise DataError(f"unknown dataset format {format!r}; use one of {', '.join(DATA_FORMATS)}")
    images = Path(images) if images else None
    reader = {"flickr8k": read_flickr8k, "karpathy": read_karpathy, "coco": read_coco,
              "csv": read_csv, "jsonl": read_jsonl, "folder": read_folder}[fmt]
    records = reader(path, images) if fmt != "folder" else reader(path)
    found = _drop_missing_images(records, path)
    if not found and records:
        folders = sorted({str(r.image.parent) for r in records})
        raise DataError(f"{path}: none of the {len(records)} captioned images is there: looked in "
                        f"{', '.join(folders[:3])}{' ...' if len(folders) > 3 else ''}; give the image folder with "
                        "--images")
    if not found:
        raise DataError(f"{path}: the dataset is empty (no image with a caption)")
    records = found
    if split_file:
        records = apply_split_file(records, split_file)
    elif not any(r.split for r in records):
        assign_split(records, val_fraction, base=path if path.is_dir() else path.parent)
    return records


def apply_split_file(records, split_file):
    """Splits from `split_file`, matched by image file name: a Karpathy json
    (images[].filename and split; restval counts as train; images it does not list are left
    out), or a text file of the validation images' names, one a line (the rest train)."""
    split_file = Path(split_file)
    if split_file.suffix.lower() == ".json":
        data = _load_json(split_file)
        try:
            splits = {img["filename"]: "train" if img["split"] == "restval" else normalise_split(img["split"])
                      for img in data["images"]}
        except (KeyError, TypeError) as e:
            raise DataError(f"{split_file}: not a Karpathy split file (images[].filename and split; "
                            f"missing {e})") from None
        kept = [r for r in records if r.image.name in splits]
        if len(kept) < len(records):
            log.warning("%s: %d images of the data are not in it and are left out", split_file,
                        len(records) - len(kept))
        for r in kept:
            r.split = splits[r.image.name]
        records = kept
    else:
        try:
            val = {line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()}
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{split_file}: cannot read the split list: {e}") from None
        for r in records:
            r.split = "val" if r.image.name in val else "train"
    if not records:
        raise DataError(f"{split_file}: no image of the data is in it")
    return records


def _drop_missing_images(records, source):
    kept = [r for r in records if r.image.is_file()]
    missing = len(records) - len(kept)
    if missing:
        example = next(r.image for r in records if not r.image.is_file())
        log.warning("%s: skipped %d captioned images whose file is missing (e.g. %s; the image folder can be "
                    "given with --images)", source, missing, example)
    return kept


def assign_split(records, val_fraction=VAL_FRACTION, base=None):
    """Split by image on a stable hash of its path (relative to `base`, the dataset's
    folder): an image is in val when its hash falls under `val_fraction`. Adding or removing
    photos never moves another, and training, resuming and `captioner evaluate` all see the
    same split. At least one image is in train, and with two or more at least one in val."""
    def position(record):
        key = os.path.relpath(record.image, base) if base else str(record.image)
        return int(hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:13], 16) / 16 ** 13
    positions = [position(r) for r in records]
    for record, p in zip(records, positions, strict=True):
        record.split = "val" if p < val_fraction else "train"
    if records and all(r.split == "val" for r in records):  # always something to train on
        records[positions.index(max(positions))].split = "train"
    if len(records) > 1 and all(r.split == "train" for r in records):
        records[positions.index(min(positions))].split = "val"
    return records


def _group(pairs, split_of=lambda image: ""):
    """(image path, caption) pairs -> Records, keeping first-seen order."""
    captions = defaultdict(list)
    for image, caption in pairs:
        captions[image].append(caption)
    return [Record(image, caps, split_of(image)) for image, caps in captions.items()]


def read_flickr8k(root, images=None):
    root = Path(root)
    images = images or root / "images"
    if not images.is_dir() and (root / "Flicker8k_Dataset").is_dir():
        images = root / "Flicker8k_Dataset"
    token_file = root / "Flickr8k.token.txt"
    split_of = {}
    for split, name in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        split_file = root / f"Flickr_8k.{name}.txt"
        if split_file.is_file():
            for line in split_file.read_text().split():
                split_of[line.strip()] = split
    pairs = []
    with open(token_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            name, hash_, _ = key.partition("#")
            if not sep or not hash_:
                raise DataError(f"{token_file}:{lineno}: expected 'IMAGE#N<TAB>caption'")
            if caption.strip():
                pairs.append((name, caption.strip()))
    records = _group(pairs)
    for r in records:
        r.split = split_of.get(r.image, "")
        r.image = images / r.image
    return records  # images in no official split (91 in Flickr8k) keep split "" and go unused


def _load_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None


def _default_image_root(json_path):
    folder = Path(json_path).parent
    return folder / "images" if (folder / "images").is_dir() else folder


def read_karpathy(path, images=None):
    path = Path(path)
    if path.is_dir():
        path = sorted(path.glob("dataset_*.json"))[0]
    images = images or _default_image_root(path)
    data = _load_json(path)
    records = []
    for i, item in enumerate(data.get("images", [])):
        try:
            filename = Path(item.get("filepath", "")) / item["filename"]
            captions = [s["raw"].strip() for s in item["sentences"] if s.get("raw", "").strip()]
            split = normalise_split(item.get("split", "train"))
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: images[{i}] lacks {e} (need filename, split, sentences[].raw)") from None
        if captions:
            records.append(Record(images / filename, captions, split))
    return records


def read_coco(path, images=None):
    """COCO captions json (images + annotations). The file has no split: read_dataset gives
    it one (a --split-file such as Karpathy's dataset_coco.json, or the stable hash split)."""
    path = Path(path)
    images = images or _default_image_root(path)
    data = _load_json(path)
    try:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        pairs = [(files[a["image_id"]], a["caption"].strip()) for a in data["annotations"] if a["caption"].strip()]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not COCO captions layout (missing {e})") from None
    records = _group(pairs)
    for r in records:
        r.image = images / r.image
    return records


def _rows_to_records(rows, path, images):
    """rows: (line number, dict) with keys image, caption and optional split."""
    pairs, splits = [], {}
    for lineno, row in rows:
        for key in ("image", "caption", "split"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise DataError(f"{path}:{lineno}: \"{key}\" must be text, not {type(row[key]).__name__} "
                                f"({row[key]!r})")
        image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
        if not image:
            raise DataError(f"{path}:{lineno}: empty image name")
        if not caption:
            raise DataError(f"{path}:{lineno}: empty caption for {image}")
        pairs.append((image, caption))
        if row.get("split"):
            splits[image] = normalise_split(row["split"])
    records = _group(pairs, lambda image: splits.get(image, ""))
    if splits and len(splits) < len(records):
        raise DataError(f"{path}: some rows have a split and others not; give every image a split or none")
    for r in records:
        r.image = images / r.image
    return records


def read_csv(path, images=None):
    path = Path(path)
    images = images or path.parent
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}; "
                                "the header must have image,caption")
            rows = [(reader.line_num, row) for row in reader]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{_line_of_byte(path, e.start)}: not UTF-8 text ({e.reason}); "
                            "save the file as UTF-8") from None
        except csv.Error as e:  # e.g. a field over csv's 128 KB limit: no caption is that long
            raise DataError(f"{path}:{reader.line_num + 1}: {e}") from None
    return _rows_to_records(rows, path, images)


def _line_of_byte(path, offset):
    """The line number of a byte offset into `path` (for decode errors, which give bytes).
    A UTF-8 BOM is counted; the offset is into the decoder's current buffer, so this is
    exact for files up to the reader's buffer size and a close guess beyond."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def read_jsonl(path, images=None):
    path = Path(path)
    images = images or path.parent
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(row, dict) or not {"image", "caption"} <= row.keys():
                raise DataError(f"{path}:{lineno}: each line needs \"image\" and \"caption\"")
            rows.append((lineno, row))
    return _rows_to_records(rows, path, images)


def read_folder(folder):
    """Images with a caption file beside each (photo.jpg + photo.txt, one caption a line)."""
    folder = Path(folder)
    records = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            continue
        captions = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not captions:
            raise DataError(f"{txt}: empty caption file")
        records.append(Record(image, captions))
    return records


def read_text_captions(path):
    """Captions without images, for the decoder's language side: a COCO captions json
    (annotations[].caption), a CSV/JSONL with a `caption` column, or a text file with one
    caption a line. -> list of caption strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption text not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _load_json(path)
        try:
            captions = [a["caption"] for a in data["annotations"]]
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: not COCO captions layout (missing {e})") from None
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "caption" not in (reader.fieldnames or []):
                raise DataError(f"{path}:1: no caption column")
            captions = [row["caption"] or "" for row in reader]
    elif suffix in (".jsonl", ".ndjson"):
        captions = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        captions.append(json.loads(line)["caption"])
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"{path}:{lineno}: expected a JSON object with a \"caption\"") from None
    else:
        try:
            captions = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from None
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise DataError(f"{path}: no captions")
    return captions
