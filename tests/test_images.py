"""load_image: every odd but valid image is read right, every bad one is an ImageError."""
import io

import numpy as np
import pytest
from PIL import Image

from captioner.images import ImageError, find_images, load_image
from conftest import bomb_png, image_bytes


def test_cmyk_and_grayscale(photos):
    cat = photos["cat"]
    out = load_image(image_bytes(cat.convert("CMYK"), "JPEG"))
    assert out.mode == "RGB" and out.size == cat.size
    assert abs(np.asarray(out, float).mean() - np.asarray(cat, float).mean()) < 15
    grey = load_image(image_bytes(cat.convert("L"), "PNG"))
    arr = np.asarray(grey)
    assert grey.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all()


def test_16_bit_grayscale_is_scaled_not_clipped():
    img = Image.fromarray(np.full((40, 60), 32896, dtype=np.uint16))  # mid-grey in 16 bits
    data = image_bytes(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(load_image(data))
    assert out.shape == (40, 60, 3) and abs(int(out.mean()) - 128) <= 1


def test_palette_with_and_without_transparency(photos):
    p = photos["coffee"].convert("P", palette=Image.ADAPTIVE, colors=64)
    assert load_image(image_bytes(p, "PNG")).mode == "RGB"
    transparent = Image.new("P", (10, 10), 0)
    transparent.putpalette([0, 0, 0] * 256)
    out = load_image(image_bytes(transparent, "PNG", transparency=0))
    assert np.asarray(out).min() == 255  # transparent black becomes white


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(load_image(image_bytes(rgba, "PNG")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[4, 4]) == (255, 255, 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = np.asarray(load_image(data))[8, 8]
    assert r > 200 and b < 50


def test_exif_rotation_applied(photos):
    cat = photos["cat"]  # 451x300, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = load_image(image_bytes(cat, "JPEG", exif=exif))
    assert out.size == (cat.height, cat.width)


def test_large_jpeg_read_at_reduced_scale_keeps_content(photos):
    big = photos["cat"].resize((2000, 1330))
    out = load_image(image_bytes(big, "JPEG"))
    assert 448 <= min(out.size) < 1330  # DCT-scaled, still above what the model needs


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (np.random.default_rng(1).bytes(5000), "not an image"),
    (b"hello, this is text\n" * 20, "not an image"),
])
def test_badimage_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(photos, fmt):
    data = image_bytes(photos["astronaut"], fmt)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb_png(30000, 30000))
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb_png(1000, 1000), max_pixels=500_000)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_find_images(image_folder):
    (image_folder / "sub").mkdir()
    (image_folder / "sub" / "deep.webp").write_bytes(b"x")
    flat = {p.name for p in find_images([image_folder])}
    assert flat == {"cat.jpg", "coffee.JPG", "rocket.png", "empty.jpg", "random.png", "truncated.jpg"}
    deep = {p.name for p in find_images([image_folder], recursive=True)}
    assert deep == flat | {"deep.webp"}
    # A file named explicitly is kept whatever its extension.
    assert [p.name for p in find_images([image_folder / "notes.txt"])] == ["notes.txt"]
