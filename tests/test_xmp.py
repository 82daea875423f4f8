"""Captions in XMP: sidecars and a JPEG's own XMP segment (captioner/xmp.py)."""
import io
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from captioner.xmp import (DC_NS, JPEG_XMP_HEADER, RDF_NS, X_NS, XML_LANG, XmpError, embed_in_jpeg, sidecar_path,
                           write_sidecar)

CAPTION = "A cat is sitting on the floor."
# A sidecar as darktable writes one: attributes, a bag, a custom namespace, a German description.
DARKTABLE_SIDECAR = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:darktable="http://darktable.sf.net/"
    xmp:Rating="4"
    darktable:xmp_version="5">
   <dc:subject><rdf:Bag><rdf:li>holiday</rdf:li><rdf:li>cat</rdf:li></rdf:Bag></dc:subject>
   <dc:description><rdf:Alt>
     <rdf:li xml:lang="x-default">old caption</rdf:li>
     <rdf:li xml:lang="de">Eine Katze</rdf:li>
   </rdf:Alt></dc:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def descriptions(packet):
    """{xml:lang: text} of dc:description in an XMP packet, parsed by the standard library."""
    root = ET.fromstring(packet)
    items = root.findall(f".//{{{RDF_NS}}}Description/{{{DC_NS}}}description/{{{RDF_NS}}}Alt/{{{RDF_NS}}}li")
    return {li.get(XML_LANG): li.text for li in items}


def exiftool_description(path):
    """dc:description as exiftool reads it, or None where exiftool is not installed."""
    if not shutil.which("exiftool"):
        return None
    return subprocess.run(["exiftool", "-s3", "-XMP-dc:Description", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_new_sidecar_is_xmp_with_the_caption(tmp_path, photos):
    photo = tmp_path / "cat.jpg"
    photos["cat"].save(photo)
    before = photo.read_bytes()
    path = write_sidecar(photo, CAPTION)
    assert path == sidecar_path(photo) == tmp_path / "cat.jpg.xmp"
    assert photo.read_bytes() == before  # the photo is never touched
    root = ET.fromstring(path.read_bytes())
    assert root.tag == f"{{{X_NS}}}xmpmeta" and root.find(f"{{{RDF_NS}}}RDF") is not None
    assert descriptions(path.read_bytes()) == {"x-default": CAPTION}
    text = path.read_text(encoding="utf-8")
    assert "<x:xmpmeta" in text and "<dc:description>" in text  # the usual prefixes
    assert exiftool_description(path) in (None, CAPTION)


def test_existing_sidecar_keeps_its_other_fields(tmp_path):
    photo = tmp_path / "cat.jpg"
    sidecar = sidecar_path(photo)
    sidecar.write_text(DARKTABLE_SIDECAR, encoding="utf-8")
    write_sidecar(photo, CAPTION)
    write_sidecar(photo, CAPTION)  # a second run changes nothing more
    packet = sidecar.read_bytes()
    assert descriptions(packet) == {"x-default": CAPTION, "de": "Eine Katze"}
    root = ET.fromstring(packet)
    description = root.find(f".//{{{RDF_NS}}}Description")
    assert description.get("{http://ns.adobe.com/xap/1.0/}Rating") == "4"
    assert description.get("{http://darktable.sf.net/}xmp_version") == "5"
    subjects = description.findall(f"{{{DC_NS}}}subject/{{{RDF_NS}}}Bag/{{{RDF_NS}}}li")
    assert [li.text for li in subjects] == ["holiday", "cat"]
    assert root.get(f"{{{X_NS}}}xmptk") == "XMP Core 4.4.0-Exiv2"
    assert 'xmlns:darktable="http://darktable.sf.net/"' in packet.decode()  # prefixes kept
    assert exiftool_description(sidecar) in (None, CAPTION)


def test_broken_sidecar_is_an_error_and_left_alone(tmp_path):
    sidecar = sidecar_path(tmp_path / "cat.jpg")
    sidecar.write_text("<x:xmpmeta unclosed")
    with pytest.raises(XmpError, match="not valid XMP"):
        write_sidecar(tmp_path / "cat.jpg", CAPTION)
    assert sidecar.read_text() == "<x:xmpmeta unclosed"


def jpeg_segments(data):
    """[(marker, bytes)] of a JPEG's segments before the image data, and the rest."""
    segments, pos = [], 2
    while data[pos + 1] != 0xDA:
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        segments.append((data[pos + 1], data[pos:end]))
        pos = end
    return segments, data[pos:]


def test_embedded_xmp_keeps_every_other_byte(tmp_path, photos):
    photo = tmp_path / "cat.jpg"
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    photos["cat"].save(photo, exif=exif, icc_profile=b"\0" * 200, quality=90)
    before = photo.read_bytes()
    photo.chmod(0o600)
    embed_in_jpeg(photo, CAPTION)
    after = photo.read_bytes()
    old_segments, old_data = jpeg_segments(before)
    new_segments, new_data = jpeg_segments(after)
    assert new_data == old_data  # the compressed image, byte for byte
    xmp = [s for m, s in new_segments if m == 0xE1 and s[4:].startswith(JPEG_XMP_HEADER)]
    assert len(xmp) == 1 and [s for s in new_segments if s[1] not in xmp] == old_segments
    assert photo.stat().st_mode & 0o777 == 0o600
    with Image.open(photo) as img, Image.open(io.BytesIO(before)) as original:
        assert np.array_equal(np.asarray(img), np.asarray(original))
        assert img.getexif()[0x010F] == "Camera maker"
        assert descriptions(img.info["xmp"]) == {"x-default": CAPTION}
    assert not list(tmp_path.glob(".*.tmp"))
    assert exiftool_description(photo) in (None, CAPTION)


def test_embedded_xmp_replaces_the_existing_packet(tmp_path, photos):
    photo = tmp_path / "cat.jpg"
    photos["cat"].save(photo, xmp=DARKTABLE_SIDECAR.split("\n", 1)[1].encode())
    embed_in_jpeg(photo, CAPTION)
    embed_in_jpeg(photo, CAPTION)
    segments, _ = jpeg_segments(photo.read_bytes())
    assert sum(m == 0xE1 and s[4:].startswith(JPEG_XMP_HEADER) for m, s in segments) == 1
    with Image.open(photo) as img:
        packet = img.info["xmp"]
    assert descriptions(packet) == {"x-default": CAPTION, "de": "Eine Katze"}
    assert b'xmp:Rating="4"' in packet


def test_embedding_refuses_what_is_not_a_jpeg(tmp_path, photos):
    photo = tmp_path / "cat.png"
    photos["cat"].save(photo)
    before = photo.read_bytes()
    with pytest.raises(XmpError, match="not a JPEG"):
        embed_in_jpeg(photo, CAPTION)
    assert photo.read_bytes() == before
