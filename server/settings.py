"""The server's settings: each one's name, default, type and meaning, written once.

`create_app(config)` starts from these defaults and `config` overrides them; gunicorn's
entry point (wsgi.py) reads each one from the environment as CAPTIONER_<NAME>. The
process settings (bind address, workers, threads, access log) are gunicorn's, in
gunicorn.conf.py.
"""
from dataclasses import dataclass

from captioner.options import DEFAULT_BACKEND


@dataclass(frozen=True)
class Setting:
    name: str  # the app.config key
    default: object
    cast: type | None  # reads it from the environment's text; None: set from Python only
    doc: str

    @property
    def env(self):
        return f"CAPTIONER_{self.name}"


SETTINGS = (
    Setting("WEIGHTS", None, str, "checkpoint path; unset: the shipped weights/"),
    Setting("DEVICE", "auto", str, "auto, cpu, cuda or cuda:N"),
    Setting("BACKEND", DEFAULT_BACKEND, str, "encoder backend (captioner.options.BACKENDS)"),
    Setting("CAPTIONER", None, None, "an already-loaded Captioner to serve (tests share one)"),
    Setting("MAX_CONTENT_LENGTH", 10 * 1024 * 1024, int, "bytes in one request body; 413 past it"),
    Setting("MAX_FILES", 16, int, "images in one request"),
    Setting("MAX_PIXELS", 40_000_000, int,
            "pixels in one image; stricter than the CLI's: a public server decodes what it is sent"),
    Setting("MAX_REQUEST_PIXELS", 160_000_000, int,
            "pixels of all images of one request together, read from their headers before decoding "
            "(413 past it); a worker decodes at most MAX_CONCURRENT_DECODES images at once, so its "
            "budget is that x MAX_PIXELS"),
    Setting("BATCH_MAX_SIZE", 16, int, "images in one model call (micro-batching)"),
    Setting("BATCH_WAIT_MS", 5.0, float, "how long the batcher collects requests for one model call"),
    Setting("REQUEST_TIMEOUT_S", 30.0, float, "how long a request waits for its captions; 503 past it"),
    Setting("MAX_CONCURRENT_DECODES", 2, int,
            "images decoded at once per worker: a big image takes many bytes per pixel while it is "
            "decoded, so request threads take turns and a burst of them cannot run a worker out of memory"),
    Setting("BUSY_WAIT_S", 1.0, float,
            "how long a request waits to start decoding before it gets 503 with Retry-After"),
    Setting("MAX_QUEUED_IMAGES", 64, int,
            "images waiting to be captioned per worker; a request that would go over gets 503 with "
            "Retry-After at once instead of waiting its whole timeout"),
    Setting("MAX_DRAIN_BYTES", 64 * 1024 * 1024, int,
            "a client that sends a body over MAX_CONTENT_LENGTH without waiting for an answer (no "
            "`Expect: 100-continue`) only reads the 413 if the body is read first: up to this many "
            "bytes are read and dropped before answering (more: the connection is closed)"),
)

DEFAULTS = {s.name: s.default for s in SETTINGS}
