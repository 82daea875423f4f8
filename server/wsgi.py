"""gunicorn entry point: `gunicorn -c server/gunicorn.conf.py server.wsgi:app`.

Settings come from the environment, so the same image runs anywhere:
CAPTIONER_WEIGHTS (checkpoint path), CAPTIONER_DEVICE (auto|cpu|cuda),
CAPTIONER_BACKEND (auto|torch|torch-bf16|onnx|onnx-int8),
CAPTIONER_MAX_CONTENT_LENGTH (bytes), CAPTIONER_MAX_FILES, CAPTIONER_MAX_PIXELS, CAPTIONER_MAX_REQUEST_PIXELS,
CAPTIONER_BATCH_MAX_SIZE, CAPTIONER_BATCH_WAIT_MS, CAPTIONER_REQUEST_TIMEOUT_S,
CAPTIONER_MAX_CONCURRENT_DECODES, CAPTIONER_BUSY_WAIT_S, CAPTIONER_MAX_QUEUED_IMAGES,
CAPTIONER_MAX_DRAIN_BYTES (see DEFAULTS in app.py).
"""
import os

from captioner.options import DEFAULT_BACKEND

from .app import create_app


def config_from_env():
    config = {"WEIGHTS": os.environ.get("CAPTIONER_WEIGHTS") or None,
              "DEVICE": os.environ.get("CAPTIONER_DEVICE", "auto"),
              "BACKEND": os.environ.get("CAPTIONER_BACKEND", DEFAULT_BACKEND)}
    for key, cast in (("MAX_CONTENT_LENGTH", int), ("MAX_FILES", int), ("MAX_PIXELS", int), ("MAX_REQUEST_PIXELS", int),
                      ("BATCH_MAX_SIZE", int), ("BATCH_WAIT_MS", float), ("REQUEST_TIMEOUT_S", float),
                      ("MAX_CONCURRENT_DECODES", int), ("BUSY_WAIT_S", float), ("MAX_QUEUED_IMAGES", int),
                      ("MAX_DRAIN_BYTES", int)):
        if os.environ.get(f"CAPTIONER_{key}"):
            config[key] = cast(os.environ[f"CAPTIONER_{key}"])
    return config


app = create_app(config_from_env())
