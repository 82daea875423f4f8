"""Attention maps as pictures, for people who audit captions (`captioner caption
--attention-dir`): one PNG per photo, a tile per caption word showing the photo with that
word's 7x7 attention weights laid over it as a heat map (bright = looked at).

The encoder squashes the photo to 224x224, so its 7x7 grid covers the whole photo whatever
its shape; the heat map is stretched the same way.
"""
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

TILE_HEIGHT = 160  # pixels per tile's photo
COLUMNS = 5  # tiles per row
LABEL_HEIGHT = 20
HEAT_COLOUR = np.array([255, 40, 0], dtype=np.float32)  # red-orange over the photo
HEAT_OPACITY = 0.65  # at the most-attended position


def heat_tile(photo, weights, height=TILE_HEIGHT):
    """The photo (PIL) scaled to `height` with one word's (7, 7) weights over it: each pixel
    blended towards HEAT_COLOUR by its weight relative to the word's largest."""
    width = max(1, round(photo.width * height / photo.height))
    base = np.asarray(photo.convert("RGB").resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    grid = np.asarray(weights, dtype=np.float32)  # (7, 7)
    grid = grid / grid.max() if grid.max() > 0 else grid
    heat = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BILINEAR))  # (h, w)
    alpha = (HEAT_OPACITY * np.clip(heat, 0, 1))[..., None]  # (h, w, 1)
    dimmed = base * 0.6  # the unattended photo is dimmed, so that the heat stands out
    return Image.fromarray((dimmed * (1 - alpha) + HEAT_COLOUR * alpha).astype(np.uint8))


def attention_figure(photo, attention, caption=None):
    """One picture: a tile per word of `attention` ([{"word", "weights"}], as decode_features
    gives it), COLUMNS to a row, each labelled with its word; `caption` above them all."""
    photo = ImageOps.exif_transpose(photo)
    tiles = [heat_tile(photo, a["weights"]) for a in attention]
    tile_w = max((t.width for t in tiles), default=TILE_HEIGHT)
    rows = max(1, -(-len(tiles) // COLUMNS))
    top = LABEL_HEIGHT if caption else 0
    figure = Image.new("RGB", (tile_w * min(COLUMNS, max(1, len(tiles))),
                               top + rows * (TILE_HEIGHT + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(figure)
    if caption:
        draw.text((4, 4), caption, fill="black")
    for i, (tile, a) in enumerate(zip(tiles, attention, strict=True)):
        x, y = (i % COLUMNS) * tile_w, top + (i // COLUMNS) * (TILE_HEIGHT + LABEL_HEIGHT)
        figure.paste(tile, (x, y))
        draw.text((x + 4, y + TILE_HEIGHT + 4), a["word"], fill="black")
    return figure


def figure_path(folder, source, root=None):
    """Where the figure of image `source` (a path or URL) goes under `folder`: its path
    relative to `root` (the common folder of the run's files) with ".attention.png" added,
    so that photos of the same name in different folders do not overwrite each other; a
    URL gets its last path part and a hash of the whole."""
    text = str(source)
    if "://" in text:
        name = text.rstrip("/").rsplit("/", 1)[-1][:80] or "image"
        return Path(folder) / f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:10]}.attention.png"
    path = Path(source).resolve()
    relative = path.relative_to(root) if root and path.is_relative_to(root) else Path(path.name)
    return Path(folder) / relative.with_name(relative.name + ".attention.png")


def write_figure(folder, source, photo, attention, caption=None, root=None):
    """Write the figure of one captioned photo (`attention` as decode_features gives it);
    -> its path."""
    out = figure_path(folder, source, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(photo, attention, caption).save(out)
    return out
