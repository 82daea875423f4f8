"""Flask application factory for the captioning API and its upload page.

Every response is JSON (the page and its assets aside); every error is
{"error": {"code", "message"}} with a 4xx status for bad input. Uploaded bytes stay in
memory: nothing a client sends is written to disk or used as a path.
"""
import ctypes
import ctypes.util
import dataclasses
import io
import sys
import json
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import torch
from flask import Flask, Request, jsonify, request, send_from_directory
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from captioner.images import ImageError, load_image, preprocess
from captioner.inference import Captioner
from captioner.options import DEFAULT_BACKEND, DecodeOptions

from .batching import BatchCaptioner, QueueFull

STATIC = Path(__file__).resolve().parent / "static"
DEFAULTS = {
    "WEIGHTS": None,  # checkpoint path; None = the shipped weights/
    "DEVICE": "auto",
    "BACKEND": DEFAULT_BACKEND,  # encoder backend (captioner.options.BACKENDS)
    "CAPTIONER": None,  # an already-loaded Captioner (tests share one)
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,
    "MAX_FILES": 16,
    "MAX_PIXELS": 40_000_000,  # stricter than the CLI's 100 MP: a public server decodes what it is sent
    # All images of one request together (read from their headers, before decoding). A worker
    # decodes at most MAX_CONCURRENT_DECODES images at once: its budget is that x MAX_PIXELS.
    "MAX_REQUEST_PIXELS": 160_000_000,
    "BATCH_MAX_SIZE": 16,
    "BATCH_WAIT_MS": 5.0,
    "REQUEST_TIMEOUT_S": 30.0,
    # A 40 MP PNG takes up to ~0.8 GB while it is decoded; request threads take turns so
    # that a burst of such files cannot run a worker out of memory.
    "MAX_CONCURRENT_DECODES": 2,
    # Saturation: a request that cannot start decoding within BUSY_WAIT_S, or that would put
    # the worker's queue of images to caption over MAX_QUEUED_IMAGES, gets 503 with
    # Retry-After at once instead of waiting its whole timeout.
    "BUSY_WAIT_S": 1.0,
    "MAX_QUEUED_IMAGES": 64,
    # A client that sends a body over MAX_CONTENT_LENGTH without waiting for an answer
    # (no `Expect: 100-continue`) only reads the 413 if the body is read first: up to this
    # many bytes are read and dropped before answering (more: the connection is closed).
    "MAX_DRAIN_BYTES": 64 * 1024 * 1024,
}


class InMemoryRequest(Request):
    """Keep uploaded files in memory (werkzeug spools big ones to a temp file); the body
    is capped by MAX_CONTENT_LENGTH."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


class ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status, code, message):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def create_app(config=None):
    app = Flask(__name__, static_folder=None)
    app.request_class = InMemoryRequest
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    captioner = app.config["CAPTIONER"] or Captioner.from_pretrained(
        app.config["WEIGHTS"], app.config["DEVICE"], backend=app.config["BACKEND"])
    metrics = _make_metrics()
    batcher = BatchCaptioner(captioner, app.config["BATCH_MAX_SIZE"], app.config["BATCH_WAIT_MS"],
                             on_batch=metrics["batch_size"].observe, max_queued=app.config["MAX_QUEUED_IMAGES"])
    decode_slots = threading.BoundedSemaphore(app.config["MAX_CONCURRENT_DECODES"])
    state = {"ready": False}
    app.extensions["captioner"] = {"captioner": captioner, "batcher": batcher, "metrics": metrics, "state": state}

    # Warm-up: one real caption through the batcher, so /readyz means "answers fast now".
    # It runs beside the app, which answers meanwhile (/readyz with 503, captions queued).
    warm = torch.stack([preprocess(Image.new("RGB", (64, 64), (128, 128, 128)))])
    batcher.submit(warm).add_done_callback(lambda f: state.update(ready=f.exception() is None))

    @app.before_request
    def start_timer():
        request.environ["captioner.start"] = time.perf_counter()

    @app.after_request
    def count_request(response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics["requests"].labels(route, str(response.status_code)).inc()
        start = request.environ.get("captioner.start")
        if start is not None:
            metrics["latency"].labels(route).observe(time.perf_counter() - start)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.errorhandler(ApiError)
    def api_error(e):
        response = error_response(e.status, e.code, e.message)
        if e.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(HTTPException)
    def http_error(e):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
                415: "unsupported_media_type"}.get(e.code, "http_error")
        message = e.description
        if e.code == 413:
            length, limit = request.content_length, app.config["MAX_CONTENT_LENGTH"]
            if length is not None and length <= limit:  # werkzeug's form limits, not the body's size
                message = (f"the form has too many parts (limit {request.max_form_parts}) or a text field "
                           f"over {request.max_form_memory_size:,} bytes; send images as files")
            else:
                message = f"request body over the limit of {limit:,} bytes"
            _drain(request, app.config["MAX_DRAIN_BYTES"])
        response = error_response(e.code, code, message)
        if e.code == 405 and getattr(e, "valid_methods", None):
            response.headers["Allow"] = ", ".join(e.valid_methods)
        return response

    @app.errorhandler(Exception)
    def internal_error(e):
        app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal error while captioning; the server is still up")

    @app.get("/")
    def index():
        response = send_from_directory(STATIC, "index.html")
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
        return response

    @app.get("/static/<name>")
    def static_file(name):
        if name not in ("app.js", "style.css"):
            raise ApiError(404, "not_found", "no such file")
        return send_from_directory(STATIC, name)

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        if not state["ready"]:
            return error_response(503, "not_ready", "model is loading")
        return jsonify({"status": "ready", "model": captioner.name, "backend": captioner.backend})

    @app.get("/metrics")
    def metrics_endpoint():
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several gunicorn workers: add them up
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = metrics["registry"]
        return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    openapi_document = openapi_with_options((STATIC / "openapi.json").read_text())

    @app.get("/openapi.json")
    def openapi():
        return app.response_class(openapi_document, mimetype="application/json")

    @app.post("/v1/captions")
    def captions():
        t0 = time.perf_counter()
        options = _parse_options()
        uploads = _read_uploads(app.config["MAX_FILES"])
        sizes = [_pixels_in_header(data) for _, data in uploads]
        total = sum(sizes)
        if total > app.config["MAX_REQUEST_PIXELS"]:
            raise ApiError(413, "too_many_pixels", f"the images hold {total:,} pixels together; the limit per "
                           f"request is {app.config['MAX_REQUEST_PIXELS']:,}: send fewer or smaller images")
        pixels = []
        try:
            for (filename, data), size in zip(uploads, sizes, strict=True):
                if not decode_slots.acquire(timeout=app.config["BUSY_WAIT_S"]):
                    raise ApiError(503, "busy", "the server is busy reading other images; retry in a second")
                try:
                    pixels.append(preprocess(load_image(data, max_pixels=app.config["MAX_PIXELS"])))
                except ImageError as e:
                    raise ApiError(400, "invalid_image", f"{filename}: {e}")
                finally:
                    decode_slots.release()
        finally:  # once per request, whatever happened: the big decodes' memory goes back
            if any(len(data) > 1_000_000 or size > 4_000_000
                   for (_, data), size in zip(uploads, sizes, strict=True)):
                release_memory()
        try:
            future = batcher.submit(torch.stack(pixels), options)
        except QueueFull:
            raise ApiError(503, "busy", "the server has more images queued than it can caption soon; "
                           "retry in a second")
        try:
            results = future.result(timeout=app.config["REQUEST_TIMEOUT_S"])
        except FutureTimeout:
            raise ApiError(503, "timeout", "the server is too busy to caption in time; try again")
        metrics["images"].inc(len(results))
        return jsonify({
            "model": captioner.name,
            "results": [{"filename": filename, "caption": r["caption"], "score": r["score"],
                         "alternatives": r["alternatives"], "objects": r["objects"]}
                        for (filename, _), r in zip(uploads, results, strict=True)],
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
        })

    return app


def openapi_with_options(document):
    """The OpenAPI text with the decoding options of POST /v1/captions filled in from
    DecodeOptions: their defaults and limits are written once, there."""
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
        parameters.append({"name": f.name, "in": "query", "schema": schema})
        form[f.name] = schema
    post = spec["paths"]["/v1/captions"]["post"]
    post["parameters"] = parameters
    post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"].update(form)
    return json.dumps(spec, indent=1)


def _parse_options():
    """DecodeOptions from the query string, or else the form; the message names the option."""
    raw = {f.name: request.args.get(f.name, request.form.get(f.name)) for f in dataclasses.fields(DecodeOptions)}
    try:
        return DecodeOptions.from_strings(raw)
    except ValueError as e:
        raise ApiError(400, "invalid_option", str(e))


def _is_image_type(mimetype):
    return not mimetype or mimetype.startswith("image/") or mimetype == "application/octet-stream"


def _read_uploads(max_files):
    """-> [(filename, bytes)] from a multipart form's `image` fields or a raw image/* body."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
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
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        data = request.get_data(cache=False)
        # werkzeug stops reading a chunked body (no Content-Length) at MAX_CONTENT_LENGTH
        # without an error: one more byte on the wire means the body was over the limit.
        if request.content_length is None and len(data) >= (request.max_content_length or float("inf")) \
                and request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
        if not data:
            raise ApiError(400, "empty_file", "empty request body")
        return [("body", data)]
    if not mimetype:
        raise ApiError(400, "missing_image", "send a multipart form with an 'image' file, or an image/* body")
    raise ApiError(415, "unsupported_media_type",
                   f"content type {mimetype} is not an image; send multipart/form-data or image/*")


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_memory():
    """Hand freed heap memory back to the OS: glibc keeps what a big decode freed, so a
    worker would otherwise stay at its peak size after a burst of large images."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _pixels_in_header(data):
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height
    except Exception:  # load_image says what is wrong with it
        return 0


def _drain(request, limit):
    """Read and drop the rest of an over-limit body (up to `limit` bytes), so that a client
    that sends it all before reading gets the 413 instead of a broken pipe."""
    length = request.content_length
    if length is None or length > limit:
        return  # too big (or unknown) to read: the server closes the connection after answering
    stream = request.environ["wsgi.input"]
    try:
        while stream.read(65536):
            pass
    except OSError:
        pass


def _make_metrics():
    registry = CollectorRegistry()
    return {
        "registry": registry,
        "requests": Counter("captioner_http_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=registry),
        "latency": Histogram("captioner_http_request_seconds", "Request latency by route", ["route"],
                             registry=registry,
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
        "images": Counter("captioner_images_captioned", "Images captioned", registry=registry),
        "batch_size": Histogram("captioner_batch_images", "Images per model call (micro-batching)",
                                registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64)),
    }
