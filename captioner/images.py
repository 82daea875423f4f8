"""Reading images safely and turning them into encoder input.

`load_image` is the one place that opens user images (CLI, server, training), so every
way in handles the same odd files the same way; `preprocess` is the one transform used
for inference and feature caching. `load_input` adds http(s) URLs for the CLI and the
library (never the server, which must not fetch for strangers).
"""
import functools
import io
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .encoder import IMAGE_SIZE, MEAN, STD
from .machine import decoding_workers

try:  # HEIC/HEIF (iPhone photos) through libheif, the optional extra captioner[heif]
    import pillow_heif
except ImportError:
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"}
# The only decoders Pillow may use. Others are a needless attack surface: EPS, for one, is
# decoded by writing the upload to a temp file and running Ghostscript on it.
IMAGE_FORMATS = ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"]  # JPEG includes MPO (phone photos)
if pillow_heif is not None:
    IMAGE_FORMATS.append("HEIF")
# The ISO-BMFF brands of HEIF stills and sequences (bytes 8-12 of the file, after "ftyp").
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
HEIF_MISSING = "HEIC/HEIF photo, but HEIF support is not installed: pip install 'captioner[heif]'"
# http(s) inputs: the most bytes read from one URL, and the seconds one may stall.
MAX_DOWNLOAD_BYTES = 50_000_000
DOWNLOAD_TIMEOUT = 30
URL_SCHEMES = ("http://", "https://")
# Refuse images above this many pixels before decoding them: a 30000x30000 PNG can be a
# few hundred KB on disk and 2.7 GB in memory. 100 MP still admits any camera photo.
MAX_PIXELS = 100_000_000
# Pillow's own bomb guard stays as a second line of defence.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """The input is not an image we can caption; the message says why."""


def load_image(source, max_pixels=MAX_PIXELS):
    """Open `source` (path, bytes, binary file object or PIL image) as an 8-bit RGB image.

    Applies the EXIF orientation, takes the first frame of animations, composites
    transparency on white, scales 16-bit and float images down to 8 bits, and reads big
    JPEGs at reduced scale (they are shrunk to 224 pixels anyway). Raises ImageError.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageError("empty file")
            source = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"no such file: {path}")
            if path.stat().st_size == 0:
                raise ImageError("empty file")
        try:
            img = Image.open(source, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            if pillow_heif is None and _is_heif(source):
                raise ImageError(HEIF_MISSING) from None
            raise ImageError("not an image (unknown or unsupported format)") from None
        except Image.DecompressionBombError:
            raise ImageError(f"image too large (over {max_pixels:,} pixels)") from None
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot open image: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels (limit {max_pixels:,})")
    if width == 0 or height == 0:
        raise ImageError("image has no pixels")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            # DCT-domain downscaling: far less work than decoding every pixel of a big photo.
            img.draft(img.mode, (IMAGE_SIZE, IMAGE_SIZE))
        img.load()
        img = _shrink(img)
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # truncated data, corrupt chunks, decoder errors of every kind
        raise ImageError(f"cannot decode image: {e}") from None


def _is_heif(source):
    """Whether the file (path or binary file object) starts as a HEIF file does."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(12)
        else:
            source.seek(0)
            head = source.read(12)
    except (OSError, ValueError, AttributeError):
        return False
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def is_url(source):
    return isinstance(source, str) and source.lower().startswith(URL_SCHEMES)


def fetch_url(url, max_bytes=MAX_DOWNLOAD_BYTES, timeout=DOWNLOAD_TIMEOUT):
    """The body of an http(s) URL, at most `max_bytes`; raises ImageError naming the URL and
    what went wrong (an HTTP status, a refused connection, a timeout, an oversized body)."""
    request = urllib.request.Request(url, headers={"User-Agent": "captioner"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"{url}: {int(length):,} bytes is over the download limit of {max_bytes:,}")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageError(f"cannot fetch {url}: {e.reason}") from None
    except TimeoutError:
        raise ImageError(f"cannot fetch {url}: no answer within {timeout} s") from None
    except (OSError, ValueError) as e:  # a connection reset mid-body, a malformed URL
        raise ImageError(f"cannot fetch {url}: {e}") from None
    if len(data) > max_bytes:
        raise ImageError(f"{url}: the body is over the download limit of {max_bytes:,} bytes")
    return data


def load_input(source, max_pixels=MAX_PIXELS):
    """`load_image`, and an http(s) URL string fetched first (`fetch_url`)."""
    return load_image(fetch_url(source) if is_url(source) else source, max_pixels)


def _shrink(img):
    """Reduce a big decoded image by a whole factor (box filter) to at least twice the model's
    input on its short side, before the mode conversions: each of them copies the image, and
    at 40 megapixels a copy is 160 MB."""
    factor = min(img.size) // (2 * IMAGE_SIZE)
    if factor >= 2 and img.mode in ("L", "LA", "RGB", "RGBA"):
        return img.reduce(factor)
    return img


def _to_rgb(img):
    if img.mode.startswith("I;16"):  # Pillow's convert("L") clips 16-bit values at 255: scale
        arr = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):  # 32-bit int or float: guess the range from the data
        arr = np.asarray(img, dtype=np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        if peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0:
            arr = arr / (257.0 if peak <= 65535 else peak / 255.0)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


def preprocess(img):
    """An RGB PIL image -> (3, 224, 224) float32 pixels as the encoder takes them:
    scale_pixels(encoder_pixels(img)).

    The same values, bit for bit, as torchvision's Resize((224, 224)) (PIL's bilinear for a
    PIL image), PILToTensor, ToDtype(float32, scale=True) and Normalize(MEAN, STD), written
    out because importing torchvision imports torch._dynamo: seconds that a one-photo
    `captioner caption` would spend on nothing else (tests/test_images.py compares the two)."""
    return scale_pixels(encoder_pixels(img))


def encoder_pixels(img):
    """An RGB PIL image -> (3, 224, 224) uint8. The Flickr8k photos we train on are stored
    squashed to 224x224, so inference squashes too (no crop): the encoder sees every photo
    the way it saw the training photos."""
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):  # PIL's resize to the same size is a copy
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def scale_pixels(pixels):
    """(..., 3, H, W) uint8 -> float32 in [0, 1], normalised by the encoder's MEAN and STD."""
    return pixels.to(torch.float32).mul_(1.0 / 255).sub_(_MEAN).div_(_STD)


def train_transform(img):
    """Train-time augmentation (only when the encoder is fine-tuned), then as preprocess."""
    return _train_augmentation()(img)


@functools.cache
def _train_augmentation():
    import torchvision.transforms.v2 as T  # here, not at the top: see preprocess

    return T.Compose([
        T.RandomResizedCrop(IMAGE_SIZE, scale=(0.75, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(MEAN, STD),
    ])


def find_images(paths, recursive=False):
    """Expand files and folders into a sorted list of image files. A file named
    explicitly is kept whatever its extension (it gets an error record if it is no image);
    an http(s) URL is kept as the string it is."""
    found = []
    for p in paths:
        if is_url(p):
            found.append(p)
            continue
        p = Path(p)
        if p.is_dir():
            walker = p.rglob("*") if recursive else p.iterdir()
            found.extend(sorted(f for f in walker if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(p)
    return found


class ImageFiles(torch.utils.data.Dataset):
    """Image files as (index, tensor or None, error or None), for a DataLoader whose
    workers decode images while the model works on the previous batch."""

    def __init__(self, paths, transform=preprocess):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform(load_input(self.paths[i])), None
        except ImageError as e:
            return i, None, str(e)


def collate_images(items):
    """-> (indices of good images, stacked tensor or None, {index: error})."""
    good = [(i, x) for i, x, _ in items if x is not None]
    errors = {i: err for i, x, err in items if x is None}
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, errors


# How much lower the decoding workers' CPU priority is than the process's: they decode
# batches ahead (prefetch), so they can wait; the encoder and the beam search, which the
# pipeline's pace depends on, then keep their cores while the workers take what is left.
WORKER_NICENESS = 10


def _lower_priority(worker_id):
    os.nice(WORKER_NICENESS)


def image_loader(paths, batch_size=32, num_workers=None, transform=preprocess, pin_memory=None):
    """Batches of decoded images, in order, decoded by worker processes; in pinned memory
    (faster copies to a GPU) where `pin_memory` says, by default where there is a GPU."""
    if num_workers is None:  # the other cores encode and beam-search (Captioner.caption_files)
        # One batch leaves nothing to decode ahead: starting a worker would only cost time.
        num_workers = decoding_workers() if len(paths) > batch_size else 0
    return torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate_images, worker_init_fn=_lower_priority,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # Each worker keeps this many batches ready: fewer of big ones, so that memory stays bounded.
        prefetch_factor=max(1, min(4, 128 // batch_size)) if num_workers else None, persistent_workers=False,
    )
