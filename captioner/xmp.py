"""Captions where photo tools read them: XMP `dc:description`, the field digiKam, darktable,
Lightroom and exiftool show as the photo's description (alt text), in a sidecar file beside
the photo or in a JPEG's own XMP segment.

A sidecar is `photo.jpg.xmp` (the name darktable and digiKam read and write); the photo's
bytes are never touched. In an existing sidecar or JPEG packet only the x-default entry of
dc:description changes: every other property, and the description's other languages, stay.
"""
import io
import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from .machine import atomic_write

X_NS = "adobe:ns:meta/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC_NS = "http://purl.org/dc/elements/1.1/"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
NAMESPACES = {"x": X_NS, "rdf": RDF_NS, "dc": DC_NS}
# The packet wrapper of the XMP specification (part 1, 7.3): the id is fixed by the spec.
PACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
PACKET_END = '\n<?xpacket end="w"?>'
# A JPEG's XMP lives in an APP1 segment that starts with this name; a segment holds at most
# 65535 bytes, its length field and this name included.
JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
MAX_JPEG_PACKET = 65535 - 2 - len(JPEG_XMP_HEADER)
# JPEG markers that stand alone, without a length: TEM and RST0-7.
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}
SOS, EOI, APP0, APP1 = 0xDA, 0xD9, 0xE0, 0xE1


for _prefix, _uri in NAMESPACES.items():  # the prefixes every XMP writer uses, not ns0, ns1 ...
    ET.register_namespace(_prefix, _uri)


class XmpError(ValueError):
    """XMP that cannot be read or written; the message says why."""


def sidecar_path(photo):
    """`photo.jpg` -> `photo.jpg.xmp`."""
    photo = Path(photo)
    return photo.with_name(photo.name + ".xmp")


def with_description(packet, caption):
    """An XMP packet (bytes) whose dc:description x-default is `caption`: `packet` (bytes of
    an existing packet or sidecar, or None for a new one) with everything else kept."""
    root = _parse(packet) if packet else ET.Element(f"{{{X_NS}}}xmpmeta")
    rdf = root if root.tag == f"{{{RDF_NS}}}RDF" else root.find(f".//{{{RDF_NS}}}RDF")
    if rdf is None:
        rdf = ET.SubElement(root, f"{{{RDF_NS}}}RDF")
    description = _description_element(rdf)
    alt = description.find(f"{{{RDF_NS}}}Alt")
    if alt is None:
        description.clear()
        alt = ET.SubElement(description, f"{{{RDF_NS}}}Alt")
    default = next((li for li in alt.findall(f"{{{RDF_NS}}}li") if li.get(XML_LANG) == "x-default"), None)
    if default is None:  # x-default comes first (XMP part 1, 8.2.2.4)
        default = ET.Element(f"{{{RDF_NS}}}li", {XML_LANG: "x-default"})
        alt.insert(0, default)
    default.text = caption
    return (PACKET_BEGIN + ET.tostring(root, encoding="unicode") + PACKET_END).encode("utf-8")


def _parse(packet):
    """The root element of an XMP packet, its namespace prefixes registered so that they are
    written back as they were (ElementTree would call them ns0, ns1 ...)."""
    try:
        for prefix, uri in _namespaces(packet):
            if prefix and not re.fullmatch(r"ns\d+", prefix):
                ET.register_namespace(prefix, uri)
        return ET.fromstring(packet)
    except ET.ParseError as e:
        raise XmpError(f"not valid XMP (XML): {e}") from None


def _namespaces(packet):
    return [ns for _, ns in ET.iterparse(io.BytesIO(packet), events=("start-ns",))]


def _description_element(rdf):
    """The dc:description property element under `rdf`, made in its first rdf:Description
    (or a new one) if there is none."""
    found = rdf.find(f"{{{RDF_NS}}}Description/{{{DC_NS}}}description")
    if found is not None:
        return found
    holder = rdf.find(f"{{{RDF_NS}}}Description")
    if holder is None:
        holder = ET.SubElement(rdf, f"{{{RDF_NS}}}Description", {f"{{{RDF_NS}}}about": ""})
    return ET.SubElement(holder, f"{{{DC_NS}}}description")


def write_sidecar(photo, caption):
    """Set the caption in `photo`'s sidecar (made if missing), replacing it in one step. -> its path."""
    path = sidecar_path(photo)
    packet = with_description(path.read_bytes() if path.is_file() else None, caption)
    with atomic_write(path) as tmp:
        tmp.write_bytes(packet)
    return path


def embed_in_jpeg(photo, caption):
    """Set the caption in a JPEG's own XMP segment (added if missing). Every other byte of the
    file stays as it was; the new file replaces the old one in one step, with its permissions."""
    photo = Path(photo)
    data = photo.read_bytes()
    segments, body_start = _jpeg_segments(data, photo)
    xmp = next(((start, end) for marker, start, end in segments
                if marker == APP1 and data[start + 4:end].startswith(JPEG_XMP_HEADER)), None)
    old_packet = data[xmp[0] + 4 + len(JPEG_XMP_HEADER):xmp[1]] if xmp else None
    packet = with_description(old_packet, caption)
    if len(packet) > MAX_JPEG_PACKET:
        raise XmpError(f"{photo}: the XMP packet would be {len(packet):,} bytes, over a JPEG segment's "
                       f"{MAX_JPEG_PACKET:,}; use a sidecar")
    segment = b"\xff\xe1" + (2 + len(JPEG_XMP_HEADER) + len(packet)).to_bytes(2, "big") + JPEG_XMP_HEADER + packet
    if xmp is None:  # after the leading JFIF/Exif segments, where readers look for it
        start = end = next((s for m, s, _ in segments if m not in (APP0, APP1)), body_start)
    else:
        start, end = xmp
    with atomic_write(photo, mode=stat.S_IMODE(os.stat(photo).st_mode)) as tmp:
        tmp.write_bytes(data[:start] + segment + data[end:])


def _jpeg_segments(data, name):
    """[(marker, start, end)] of the segments before the image data, and where the data
    (the SOS segment) starts. Raises XmpError for a file that is no JPEG."""
    if not data.startswith(b"\xff\xd8"):
        raise XmpError(f"{name}: not a JPEG; only JPEG files get embedded XMP (use a sidecar)")
    segments, pos = [], 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise XmpError(f"{name}: damaged JPEG (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (SOS, EOI):
            return segments, pos
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        segments.append((marker, pos, end))
        pos = end
    raise XmpError(f"{name}: damaged JPEG (no image data)")
