"""load_image: every odd but valid image is read right, every bad one is an ImageError;
http(s) inputs for the CLI and the library (load_input)."""
import contextlib
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from conftest import image_bytes, png_1bit
from PIL import Image, ImageFile

from captioner import images
from captioner.images import (MAX_PIXELS, ImageError, collate_images, find_images, fetch_url, image_loader,
                              load_image, load_input, preprocess)


def _pixel(img, xy):
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


def test_rgb_from_path_bytes_file_and_pil_agree(tmp_path, photos):
    photos["cat"].save(tmp_path / "cat.png")
    from_path = load_image(tmp_path / "cat.png")
    assert from_path.mode == "RGB" and from_path.size == photos["cat"].size
    assert np.array_equal(np.asarray(from_path), np.asarray(photos["cat"]))
    data = (tmp_path / "cat.png").read_bytes()
    for source in (str(tmp_path / "cat.png"), data, bytearray(data), io.BytesIO(data), Image.open(io.BytesIO(data))):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(from_path)), type(source)


def test_cmyk_jpeg(photos):
    cat = photos["cat"]
    data = image_bytes(cat.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.mode == "RGB" and out.size == cat.size
    diff = np.abs(np.asarray(out, float) - np.asarray(cat, float))
    assert diff.mean() < 10  # colours survive (not inverted, not garbled)


def test_grayscale(photos):
    grey = photos["cat"].convert("L")
    for fmt in ("PNG", "JPEG"):
        out = load_image(image_bytes(grey, fmt))
        arr = np.asarray(out)
        assert out.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        assert abs(arr[..., 0].astype(float).mean() - np.asarray(grey, float).mean()) < 2
    la = Image.merge("LA", [grey, Image.new("L", grey.size, 255)])
    assert np.array_equal(np.asarray(load_image(image_bytes(la, "PNG")))[..., 0], np.asarray(grey))


def test_16_bit_grayscale_png_is_scaled_not_clipped():
    mid = Image.fromarray(np.full((40, 60), 32896, dtype=np.uint16))  # 0x8080: mid-grey in 16 bits
    data = image_bytes(mid, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = np.asarray(load_image(data))
    assert out.shape == (40, 60, 3) and np.all(np.abs(out.astype(int) - 128) <= 1)
    # A full-range gradient keeps its range instead of turning white above 255.
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1)))
    row = np.asarray(load_image(image_bytes(ramp, "PNG")))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1
    assert (np.diff(row) >= 0).all() and len(set(row.tolist())) > 200


def test_32_bit_and_float_images():
    as_int = Image.fromarray(np.full((4, 4), 65535 // 4, dtype=np.int32))  # mode I, 16-bit range
    assert as_int.mode == "I"
    assert abs(_pixel(load_image(image_bytes(as_int, "TIFF")), (0, 0))[0] - 64) <= 1
    unit = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))  # mode F in [0, 1]
    assert unit.mode == "F" and abs(_pixel(load_image(unit), (1, 1))[0] - 128) <= 1


def test_palette_without_transparency(photos):
    p = photos["coffee"].convert("P", palette=Image.ADAPTIVE, colors=64)
    out = load_image(image_bytes(p, "PNG"))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(p.convert("RGB")))


def test_palette_with_transparency():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    img.paste(1, (0, 0, 5, 10))  # left half: opaque colour 1; right half: colour 0, transparent
    for fmt in ("PNG", "GIF"):
        out = load_image(image_bytes(img, fmt, transparency=0))
        assert _pixel(out, (2, 5)) == (200, 30, 40), fmt
        assert _pixel(out, (8, 5)) == (255, 255, 255), fmt  # transparent black becomes white


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    out = load_image(image_bytes(rgba, "PNG"))
    assert out.mode == "RGB"
    assert _pixel(out, (0, 0)) == (255, 0, 0)
    assert _pixel(out, (4, 4)) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in _pixel(out, (1, 0)))
    assert _pixel(load_image(rgba), (4, 4)) == (255, 255, 255)  # a PIL image in memory too


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    r, g, b = _pixel(load_image(data), (8, 8))
    assert r > 200 and g < 50 and b < 50
    opened = Image.open(io.BytesIO(data))
    opened.seek(2)  # an image left at a later frame still gives the first
    r, g, b = _pixel(load_image(opened), (8, 8))
    assert r > 200 and g < 50
    webp = image_bytes(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert _pixel(load_image(webp), (8, 8))[0] > 200


def test_exif_rotated_jpeg():
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 40))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: turn 90 degrees clockwise to display
    out = load_image(image_bytes(img, "JPEG", exif=exif, quality=95))
    assert out.size == (40, 60)  # width and height swapped
    top, bottom = _pixel(out, (20, 5)), _pixel(out, (20, 55))
    assert top[0] > 200 and top[2] < 60  # the left (red) side is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert load_image(image_bytes(img, "JPEG")).size == (60, 40)  # no tag: untouched


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_or_odd_exif_does_not_fail_a_good_image():
    img = Image.new("RGB", (30, 20), (10, 200, 30))
    for exif in (b"Exif\x00\x00" + b"\xff" * 40,  # garbage
                 b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03",  # cut short
                 b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00"):
        out = load_image(image_bytes(img, "JPEG", exif=exif))  # the last one: orientation 9, invalid
        assert out.size == (30, 20) and _pixel(out, (15, 10))[1] > 150


def test_big_jpeg_is_read_at_reduced_scale(photos):
    big = photos["cat"].resize((2000, 1330))
    out = load_image(image_bytes(big, "JPEG"))
    assert 224 <= min(out.size) < 1330  # DCT-scaled, still no smaller than what the model needs
    assert abs(out.size[0] / out.size[1] - 2000 / 1330) < 0.02


def test_preprocess():
    x = preprocess(Image.new("RGB", (640, 100), (255, 255, 255)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 128 / 128))  # (255 - 127) / 128 = 1.0
    assert torch.allclose(preprocess(Image.new("RGB", (5, 5))), torch.full((3, 224, 224), -127 / 128))


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (np.random.default_rng(1).bytes(5000), "not an image"),
    (b"hello, this is text\n" * 20, "not an image"),
    (b"\x89PNG\r\n\x1a\n", "not an image|cannot"),  # a PNG signature and nothing else
    (b"\xff\xd8\xff", "not an image|cannot"),  # a JPEG start and nothing else
])
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated(photos, fmt):
    data = image_bytes(photos["astronaut"], fmt)
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path)  # a folder
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.jpg").write_text("a text file with an image's name\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.jpg")


@pytest.fixture(scope="module")
def bomb():
    data = png_1bit(30000, 30000)
    assert len(data) < 1_000_000  # small on disk, 900 megapixels when decoded
    return data


def test_valid_small_1_bit_png_loads():
    out = load_image(png_1bit(20, 10))
    assert out.size == (20, 10) and _pixel(out, (3, 3)) == (0, 0, 0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_refused_before_decoding(tmp_path, bomb, monkeypatch):
    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    (tmp_path / "bomb.png").write_bytes(bomb)
    for source in (bomb, tmp_path / "bomb.png"):
        with pytest.raises(ImageError, match="too large"):
            load_image(source)
    # Between our limit and twice it (where Pillow itself only warns) our own check refuses.
    with pytest.raises(ImageError, match="too large: 12000x10000 pixels"):
        load_image(png_1bit(12000, 10000, rows=1))
    with pytest.raises(ImageError, match="too large: 1000x1000"):
        load_image(png_1bit(1000, 1000, rows=1), max_pixels=500_000)
    assert 12000 * 10000 > MAX_PIXELS


def test_find_images(image_folder):
    (image_folder / "sub").mkdir()
    (image_folder / "sub" / "deep.webp").write_bytes(b"x")
    (image_folder / "sub" / "DEEP2.PNG").write_bytes(b"x")
    (image_folder / "a_folder.jpg").mkdir()  # a folder with an image's name is not an image
    flat = [p.name for p in find_images([image_folder])]
    assert flat == sorted(flat)
    assert set(flat) == {"cat.jpg", "coffee.JPG", "rocket.png", "empty.jpg", "random.png", "truncated.jpg"}
    deep = {p.name for p in find_images([image_folder], recursive=True)}
    assert deep == set(flat) | {"deep.webp", "DEEP2.PNG"}
    # A file named explicitly is kept whatever its extension (and gets an error record later).
    assert [p.name for p in find_images([image_folder / "notes.txt", image_folder / "cat.jpg"])] == \
        ["notes.txt", "cat.jpg"]


def test_image_loader_reports_errors_by_index(image_folder):
    paths = [image_folder / n for n in ("cat.jpg", "empty.jpg", "rocket.png", "random.png", "truncated.jpg")]
    seen, errors = [], {}
    for idx, pixels, errs in image_loader(paths, batch_size=2, num_workers=0):
        assert pixels is None or pixels.shape == (len(idx), 3, 224, 224)
        seen += idx
        errors.update(errs)
    assert seen == [0, 2] and sorted(errors) == [1, 3, 4]
    assert "empty" in errors[1] and "not an image" in errors[3]
    assert collate_images([(0, None, "bad")]) == ([], None, {0: "bad"})


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "ICO"])
def test_formats_outside_the_allowed_list_are_refused(fmt):
    # EPS would be decoded by writing the bytes to a temp file and running Ghostscript.
    with pytest.raises(ImageError, match="not an image"):
        load_image(image_bytes(Image.new("RGB", (16, 16)), fmt))


def test_dark_16_bit_image_stays_dark():
    # Values up to 255 in a 16-bit image are near black, not mid-grey 8-bit values.
    data = image_bytes(Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)), "PNG")
    assert np.asarray(load_image(data)).max() <= 1


def test_heic_photos_are_read_and_found(tmp_path, photos):
    pillow_heif = pytest.importorskip("pillow_heif")
    assert images.pillow_heif is pillow_heif and "HEIF" in images.IMAGE_FORMATS
    photos["cat"].save(tmp_path / "cat.HEIC", format="HEIF", quality=95)
    photos["cat"].save(tmp_path / "cat.heif", format="HEIF", quality=95)
    assert [p.name for p in find_images([tmp_path])] == ["cat.HEIC", "cat.heif"]
    img = load_image(tmp_path / "cat.HEIC")
    assert img.mode == "RGB" and img.size == photos["cat"].size
    difference = np.abs(np.asarray(img, dtype=float) - np.asarray(photos["cat"], dtype=float)).mean()
    assert difference < 8  # lossy, but the same photo


def test_heic_without_pillow_heif_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "pillow_heif", None)
    monkeypatch.setattr(images, "IMAGE_FORMATS", [f for f in images.IMAGE_FORMATS if f != "HEIF"])
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100)  # the start of an iPhone photo
    (tmp_path / "IMG_0001.HEIC").write_bytes(heic)
    for source in (heic, tmp_path / "IMG_0001.HEIC"):
        with pytest.raises(ImageError, match=r"pip install 'captioner\[heif\]'"):
            load_image(source)


class PhotoHandler(http.server.BaseHTTPRequestHandler):
    """/cat.jpg: a photo; /sized: 2,000 bytes announced; /unsized: 2,000 bytes, no length; else 404."""
    photo = b""

    def do_GET(self):
        if self.path == "/cat.jpg":
            self._send(self.photo, "image/jpeg")
        elif self.path == "/sized":
            self._send(bytes(2000), "image/jpeg")
        elif self.path == "/unsized":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(bytes(2000))
            self.close_connection = True
        else:
            self.send_error(404, "Not Found")

    def _send(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def photo_server(photo):
    """A local web server in a thread serving `photo` (JPEG bytes); yields its base URL."""
    handler = type("Handler", (PhotoHandler,), {"photo": photo})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_inputs(photos):
    photo = image_bytes(photos["cat"])
    with photo_server(photo) as base:
        assert fetch_url(f"{base}/cat.jpg") == photo
        assert np.array_equal(np.asarray(load_input(f"{base}/cat.jpg")), np.asarray(load_image(photo)))
        with pytest.raises(ImageError, match=r"cannot fetch .*/missing.jpg: HTTP 404"):
            load_input(f"{base}/missing.jpg")
        with pytest.raises(ImageError, match="2,000 bytes is over the download limit of 1,000"):
            fetch_url(f"{base}/sized", max_bytes=1000)
        with pytest.raises(ImageError, match="over the download limit of 1,000 bytes"):
            fetch_url(f"{base}/unsized", max_bytes=1000)
        assert len(fetch_url(f"{base}/unsized", max_bytes=2000)) == 2000
        # URLs stay strings in a file list (Path would fold "//" into "/").
        assert find_images([f"{base}/cat.jpg"]) == [f"{base}/cat.jpg"]
    with pytest.raises(ImageError, match="cannot fetch"):  # the server is gone: connection refused
        load_input(f"{base}/cat.jpg")
    with pytest.raises(ImageError, match="no such file"):  # load_image itself never fetches (the server uses it)
        load_image(f"{base}/cat.jpg")


def test_library_captions_a_url(tiny_captioner, photos):
    photo = image_bytes(photos["cat"])
    with photo_server(photo) as base:
        from_url = tiny_captioner.caption(f"{base}/cat.jpg")
        assert [r["caption"] for r in tiny_captioner.caption([f"{base}/cat.jpg", photo])] == [from_url["caption"]] * 2
        with pytest.raises(ImageError, match="HTTP 404"):
            tiny_captioner.caption(f"{base}/missing.jpg")


def test_preprocess_equals_torchvision_bit_for_bit(photos):
    """preprocess is written without torchvision (whose import costs a one-photo run seconds)
    and gives exactly what torchvision's transforms give, so features and captions are unchanged."""
    import subprocess
    import sys

    import torchvision.transforms.v2 as T

    from captioner.encoder import IMAGE_SIZE, MEAN, STD

    reference = T.Compose([T.Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True), T.PILToTensor(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    for img in [*photos.values(), photos["cat"].resize((224, 224)), photos["coffee"].resize((100, 300)),
                Image.new("RGB", (1, 1), (255, 0, 7))]:
        got = preprocess(img)
        assert got.dtype == torch.float32 and got.shape == (3, 224, 224)
        assert torch.equal(got, reference(img))
    imported = subprocess.run([sys.executable, "-c", "import sys, captioner.cli, captioner.inference, server.app; "
                               "print('torchvision' in sys.modules)"], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"


def test_one_batch_starts_no_decoding_worker(image_folder):
    from captioner.machine import decoding_workers

    paths = [image_folder / "cat.jpg"] * 3
    assert image_loader(paths, batch_size=3).num_workers == 0  # nothing to decode ahead
    assert image_loader(paths, batch_size=2).num_workers == decoding_workers()
    assert image_loader(paths, batch_size=3, num_workers=1).num_workers == 1  # asked for
