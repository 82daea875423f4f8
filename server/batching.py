"""Micro-batching: concurrent requests in one worker share a model call.

Request threads put (pixels, options) on a queue and wait on a Future. One model thread
takes the first waiting request, then keeps collecting for at most `max_wait_ms` or until
`max_batch` images are in hand, and captions each group of requests with the same decoding
options in a single `caption_pixels` call: the encoder and the beam search see the whole
batch, which is what lets one CPU box serve many clients.
"""
import logging
import queue
import threading
import time
from concurrent.futures import Future

import torch

from captioner.options import DecodeOptions

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker has more images waiting than it may queue (503 for the client)."""


class BatchCaptioner:
    def __init__(self, captioner, max_batch=16, max_wait_ms=5.0, on_batch=None, max_queued=None):
        self.captioner = captioner
        self.max_queued = max_queued  # images waiting or in the model at most; None: no bound
        self.queued = 0
        self.lock = threading.Lock()
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch or (lambda n: None)  # metrics hook: images per model call
        self.requests = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="caption-batcher", daemon=True)
        self.thread.start()

    def submit(self, pixels, options=None):
        """Queue (N, 3, H, W) preprocessed images with their DecodeOptions (None: the
        defaults); returns a Future of N result dicts. Raises QueueFull past `max_queued`."""
        with self.lock:
            if self.max_queued is not None and self.queued and self.queued + len(pixels) > self.max_queued:
                raise QueueFull(f"{self.queued} images queued")
            self.queued += len(pixels)
        future = Future()
        future.add_done_callback(lambda f, n=len(pixels): self._done(n))
        self.requests.put((pixels, options or DecodeOptions(), future))
        return future

    def _done(self, n):
        with self.lock:
            self.queued -= n

    def _collect(self):
        batch = [self.requests.get()]
        images = len(batch[0][0])
        deadline = time.monotonic() + self.max_wait
        while images < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self.requests.get(timeout=remaining)
            except queue.Empty:
                break
            batch.append(item)
            images += len(item[0])
        return batch

    def _run(self):
        while True:
            batch = self._collect()
            groups = {}
            for item in batch:
                groups.setdefault(item[1], []).append(item)
            for options, items in groups.items():
                try:
                    pixels = torch.cat([p for p, _, _ in items])
                    results = self.captioner.caption_pixels(pixels, options)
                    self.on_batch(len(pixels))
                except Exception as e:  # a failed batch fails its requests, never the thread
                    log.exception("captioning batch failed")
                    for _, _, future in items:
                        future.set_exception(e)
                    continue
                start = 0
                for p, _, future in items:
                    future.set_result(results[start:start + len(p)])
                    start += len(p)
