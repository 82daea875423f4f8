"""Flask application factory for the captioning API (api.py) and its upload page (pages.py).

Every response is JSON (the page and its assets aside); every error is
{"error": {"code", "message"}} (errors.py). The settings, their defaults and meaning are
in settings.py.
"""
import io
import threading
import time

import torch
from flask import Flask, Request, current_app, request
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Histogram
from werkzeug.exceptions import HTTPException

from captioner.images import preprocess
from captioner.inference import Captioner

from . import api, errors, pages
from .batching import BatchCaptioner
from .settings import DEFAULTS


class InMemoryRequest(Request):
    """Keep uploaded files in memory (werkzeug spools big ones to a temp file); the body
    is capped by MAX_CONTENT_LENGTH."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def create_app(config=None):
    """The app, with settings.SETTINGS' defaults overridden by `config`, e.g.
    create_app({"WEIGHTS": "run/model.safetensors", "MAX_FILES": 4})."""
    app = Flask(__name__, static_folder=None)
    app.request_class = InMemoryRequest
    app.config.update(DEFAULTS)
    app.config.update(config or {})

    captioner = app.config["CAPTIONER"] or Captioner.from_pretrained(
        app.config["WEIGHTS"], app.config["DEVICE"], backend=app.config["BACKEND"])
    metrics = make_metrics()
    batcher = BatchCaptioner(captioner, app.config["BATCH_MAX_SIZE"], app.config["BATCH_WAIT_MS"],
                             on_batch=metrics["batch_size"].observe, max_queued=app.config["MAX_QUEUED_IMAGES"])
    app.extensions["captioner"] = {
        "captioner": captioner,
        "batcher": batcher,
        "decode_slots": threading.BoundedSemaphore(app.config["MAX_CONCURRENT_DECODES"]),
        "metrics": metrics,
        "ready": warm_up(batcher),
    }

    app.before_request(start_timer)
    app.after_request(count_request)
    app.register_error_handler(errors.ApiError, errors.api_error)
    app.register_error_handler(HTTPException, errors.http_error)
    app.register_error_handler(Exception, errors.internal_error)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    return app


def warm_up(batcher):
    """Send one real caption through the batcher, so that /readyz means "answers fast now";
    -> an Event set once it is done. It runs beside the app, which answers meanwhile
    (/readyz with 503, captions queued)."""
    ready = threading.Event()

    def done(future):
        if future.exception() is None:
            ready.set()

    grey = torch.stack([preprocess(Image.new("RGB", (64, 64), (128, 128, 128)))])
    batcher.submit(grey).add_done_callback(done)
    return ready


def make_metrics():
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


def start_timer():
    request.environ["captioner.start"] = time.perf_counter()


def count_request(response):
    """Count every response and time it by route (its URL rule, so that /static/app.js and
    /static/style.css are one route); add the header every response carries."""
    metrics = current_app.extensions["captioner"]["metrics"]
    route = request.url_rule.rule if request.url_rule else "unmatched"
    metrics["requests"].labels(route, str(response.status_code)).inc()
    start = request.environ.get("captioner.start")
    if start is not None:
        metrics["latency"].labels(route).observe(time.perf_counter() - start)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response
