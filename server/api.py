"""The JSON API: health and readiness probes, Prometheus metrics, the OpenAPI document,
GET /v1/model (what the served model is) and POST /v1/captions.

Uploaded bytes stay in memory: nothing a client sends is written to disk or used as a
path. The worker's captioner, batcher, decode slots and metrics are in
`current_app.extensions["captioner"]` (create_app puts them there).
"""
import ctypes
import ctypes.util
import dataclasses
import io
import json
import os
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import torch
from flask import Blueprint, current_app, jsonify, request
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import RequestEntityTooLarge

from captioner import __version__
from captioner.encoder import MAP_SIZE
from captioner.images import ImageError, load_image, preprocess
from captioner.inference import DEFAULT_WEIGHTS
from captioner.options import DecodeOptions

from .batching import QueueFull
from .errors import ApiError, error_response
from .pages import STATIC

# After a request with an upload this big (bytes, or pixels in its header), freed heap
# memory is handed back to the OS (release_memory).
BIG_UPLOAD_BYTES = 1_000_000
BIG_IMAGE_PIXELS = 4_000_000

bp = Blueprint("api", __name__)


def _worker():
    """The worker's shared state: {"captioner", "batcher", "decode_slots", "metrics", "ready"}."""
    return current_app.extensions["captioner"]


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    worker = _worker()
    if not worker["ready"].is_set():
        return error_response(503, "not_ready", "model is loading")
    captioner = worker["captioner"]
    return jsonify({"status": "ready", "model": captioner.name, "backend": captioner.backend})


@bp.get("/metrics")
def metrics():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several gunicorn workers: add them up
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = _worker()["metrics"]["registry"]
    return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


def openapi_with_options(document):
    """The OpenAPI text with the decoding options of POST /v1/captions filled in from
    DecodeOptions: their defaults, limits and descriptions are written once, there."""
    spec = json.loads(document)
    defaults, parameters, form = DecodeOptions(), [], {}
    for f in dataclasses.fields(DecodeOptions):
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            schema = {"type": "boolean", "default": default}
        else:
            low, high = DecodeOptions.LIMITS[f.name]
            schema = {"type": "integer" if isinstance(default, int) else "number",
                      "minimum": low, "maximum": high, "default": default}
        help_text = f.metadata["help"]
        parameters.append({"name": f.name, "in": "query", "description": help_text, "example": default,
                           "schema": schema})
        form[f.name] = {**schema, "description": help_text, "example": default}
    post = spec["paths"]["/v1/captions"]["post"]
    post["parameters"] = parameters
    post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"].update(form)
    return json.dumps(spec, indent=1)


OPENAPI_DOCUMENT = openapi_with_options((STATIC / "openapi.json").read_text())


@bp.get("/openapi.json")
def openapi():
    return current_app.response_class(OPENAPI_DOCUMENT, mimetype="application/json")


@bp.get("/v1/model")
def model_metadata():
    return jsonify(model_info(_worker()["captioner"], current_app.config["WEIGHTS"]))


def model_info(captioner, weights):
    """What the served model is: from the checkpoint's own info and config, and from its
    card (read_card) for the licence, the training data and the scores."""
    info, config = captioner.info, captioner.model.config
    card = read_card(weights, captioner.name)
    architecture = (f"Show and Tell: {config.encoder} image features ({config.feature_dim}-d) initialise a "
                    f"{config.num_layers}-layer {config.cell.upper()} decoder (hidden size {config.hidden_dim})")
    if config.attention:
        architecture += f" that attends over the {MAP_SIZE}x{MAP_SIZE} feature map at every word (Show, Attend, Tell)"
    if config.num_concepts:
        architecture += f", grounded on {config.num_concepts} ImageNet concepts"
    return {
        "name": captioner.name,
        "version": __version__,
        "architecture": architecture,
        "encoder": {"name": config.encoder, "fine_tuned": captioner.model.encoder_tuned,
                    "backend": captioner.backend},
        "vocabulary_size": config.vocab_size,
        "attention": config.attention,
        "config": config.to_dict(),
        "training_data": card.get("training_data") or info.get("data"),
        "training_stages": info.get("stages", []),
        "calibration": info.get("calibration"),
        "license": card.get("license"),
        "scores": card.get("scores", []),
    }


def card_path(weights):
    """The card of a checkpoint: beside it, with .card.json for .safetensors
    (weights/model.safetensors -> weights/model.card.json)."""
    path = Path(weights or DEFAULT_WEIGHTS)
    if path.is_dir():
        path = path / "model.safetensors"
    return path.with_suffix(".card.json")


def read_card(weights, name):
    """The checkpoint's card as a dict: {"name", "license", "training_data", "scores"}; {}
    where there is none, or where it names another model (a card never describes a model
    it was not written for)."""
    path = card_path(weights)
    if not path.is_file():
        return {}
    card = json.loads(path.read_text())
    return card if card.get("name") == name else {}


@bp.post("/v1/captions")
def captions():
    t0 = time.perf_counter()
    options = _parse_options()
    if options.attention and not _worker()["captioner"].model.config.attention:
        raise ApiError(400, "invalid_option", "attention maps need a model with attention; the served model reads "
                       "the pooled feature only")
    uploads = _read_uploads(current_app.config["MAX_FILES"])
    sizes = _check_pixel_budget(uploads, current_app.config["MAX_REQUEST_PIXELS"])
    pixels = _decode(uploads, sizes)
    results = _caption(pixels, options)
    _worker()["metrics"]["images"].inc(len(results))
    return jsonify({
        "model": _worker()["captioner"].name,
        "results": [{"filename": filename, "caption": r["caption"], "score": r["score"],
                     "confidence": r["confidence"], "alternatives": r["alternatives"], "objects": r["objects"],
                     **({"attention": r["attention"]} if "attention" in r else {})}
                    for (filename, _), r in zip(uploads, results, strict=True)],
        "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
    })


def _parse_options():
    """DecodeOptions from the query string, or else the form; the message names the option."""
    raw = {f.name: request.args.get(f.name, request.form.get(f.name)) for f in dataclasses.fields(DecodeOptions)}
    try:
        return DecodeOptions.from_strings(raw)
    except ValueError as e:
        raise ApiError(400, "invalid_option", str(e))


def _read_uploads(max_files):
    """-> [(filename, bytes)] from a multipart form's `image` fields or a raw image/* body."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        return _read_form_files(max_files)
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        return [("body", _read_body())]
    if not mimetype:
        raise ApiError(400, "missing_image", "send a multipart form with an 'image' file, or an image/* body")
    raise ApiError(415, "unsupported_media_type",
                   f"content type {mimetype} is not an image; send multipart/form-data or image/*")


def _is_image_type(mimetype):
    return not mimetype or mimetype.startswith("image/") or mimetype == "application/octet-stream"


def _read_form_files(max_files):
    files = request.files.getlist("image")
    if not files:
        if "image" in request.form:
            raise ApiError(400, "missing_image", "the form field 'image' holds text, not a file: send it as a "
                           "file part (with a filename)")
        if not request.form and not request.files and request.content_length:
            raise ApiError(400, "malformed_multipart", "the multipart body could not be parsed (a missing or "
                           "wrong boundary, a cut-off part, or part headers that are not UTF-8, such as a "
                           "file name in another encoding)")
        raise ApiError(400, "missing_image", "no file in the form field 'image'")
    if len(files) > max_files:
        raise ApiError(400, "too_many_files", f"{len(files)} files in one request; the limit is {max_files}")
    uploads = []
    for i, f in enumerate(files):
        name = f.filename or f"image-{i}"
        if not _is_image_type(f.mimetype):
            raise ApiError(415, "unsupported_media_type", f"{name}: declared type {f.mimetype} is not an image")
        data = f.read()
        if not data:
            raise ApiError(400, "empty_file", f"{name}: empty file")
        uploads.append((name, data))
    return uploads


def _read_body():
    data = request.get_data(cache=False)
    # werkzeug stops reading a chunked body (no Content-Length) at MAX_CONTENT_LENGTH
    # without an error: one more byte on the wire means the body was over the limit.
    if request.content_length is None and len(data) >= (request.max_content_length or float("inf")) \
            and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    if not data:
        raise ApiError(400, "empty_file", "empty request body")
    return data


def _check_pixel_budget(uploads, limit):
    """-> each upload's pixels, read from its header; 413 if together they are over `limit`."""
    sizes = [_pixels_in_header(data) for _, data in uploads]
    total = sum(sizes)
    if total > limit:
        raise ApiError(413, "too_many_pixels", f"the images hold {total:,} pixels together; the limit per "
                       f"request is {limit:,}: send fewer or smaller images")
    return sizes


def _pixels_in_header(data):
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height
    except Exception:  # load_image says what is wrong with it
        return 0


def _decode(uploads, sizes):
    """-> one preprocessed image tensor per upload. Request threads take turns through the
    worker's decode slots, so only MAX_CONCURRENT_DECODES images are decoded at once."""
    config, slots = current_app.config, _worker()["decode_slots"]
    pixels = []
    try:
        for filename, data in uploads:
            if not slots.acquire(timeout=config["BUSY_WAIT_S"]):
                raise ApiError(503, "busy", "the server is busy reading other images; retry in a second")
            try:
                pixels.append(preprocess(load_image(data, max_pixels=config["MAX_PIXELS"])))
            except ImageError as e:
                raise ApiError(400, "invalid_image", f"{filename}: {e}")
            finally:
                slots.release()
    finally:  # once per request, whatever happened: the big decodes' memory goes back
        if any(len(data) > BIG_UPLOAD_BYTES or size > BIG_IMAGE_PIXELS
               for (_, data), size in zip(uploads, sizes, strict=True)):
            release_memory()
    return pixels


def _caption(pixels, options):
    """Queue the images on the worker's batcher and wait for their results; 503 when the
    queue is full or the answer does not come within REQUEST_TIMEOUT_S."""
    try:
        future = _worker()["batcher"].submit(torch.stack(pixels), options)
    except QueueFull:
        raise ApiError(503, "busy", "the server has more images queued than it can caption soon; "
                       "retry in a second")
    try:
        return future.result(timeout=current_app.config["REQUEST_TIMEOUT_S"])
    except FutureTimeout:
        raise ApiError(503, "timeout", "the server is too busy to caption in time; try again")


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_memory():
    """Hand freed heap memory back to the OS: glibc keeps what a big decode freed, so a
    worker would otherwise stay at its peak size after a burst of large images."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
