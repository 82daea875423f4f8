"""Image features for `captioner train`: each photo is encoded once and kept in the feature
store (feature_store.py), so that a rerun, or another run on the same photos, starts
decoding at once. `encode_missing` fills the store; `compute_features` fills it and reads
the features back. For an attention model (`spatial=True`) the store keeps each photo's
7x7 map too, as float16, under keys of their own: a pooled-only entry never stands in for one.
"""
import logging
import os
from typing import NamedTuple

import torch
from tqdm import tqdm

from .backends import load_backend, resolve_backend
from .encoder import MAP_POSITIONS
from .export import weights_hash
from .feature_store import FEATURE_CACHE_VERSION, FeatureStore, common_folder, file_info, file_key
from .images import image_loader
from .machine import DEFAULT_CACHE_DIR
from .options import DEFAULT_BACKEND

log = logging.getLogger(__name__)

FLUSH_EVERY = 2000  # images per shard while encoding: an interrupted run loses at most the last few
BATCH_SIZE = 64  # images per encoder call


class _KeyedPaths(NamedTuple):
    """Image paths as the feature store knows them, for one encoder and backend."""
    paths: list
    store: FeatureStore  # the store of the folder that holds them all
    keys: list  # per path, its feature_key
    files: list  # per path, (real path, size, mtime_ns)
    backend: str  # the resolved backend name ("auto" replaced)
    weights: str  # export.weights_hash of the encoder
    spatial: bool  # entries with the spatial maps


def _key_paths(model, paths, device, cache_dir, backend, spatial=False):
    files = [file_info(p) for p in paths]
    name = resolve_backend(backend, device)
    weights = weights_hash(model.encoder)  # once per call, not per image: it hashes every weight
    kind = f"{name}+maps" if spatial else name
    keys = [file_key(*f, kind, weights) for f in files]
    root = common_folder([f[0] for f in files]) if files else os.getcwd()
    return _KeyedPaths(list(paths), FeatureStore(cache_dir, root), keys, files, name, weights, spatial)


def _encode(keyed, model, device, cache_dir, batch_size, num_workers, backend, part):
    """Encode this rank's share of `keyed` that the store lacks. -> number of images encoded."""
    rank, world = part
    paths = keyed.paths
    # This rank's share is drawn from all of `paths`, not from what is missing when it looks:
    # another rank may have stored a shard by then, and shares of different to-do lists could
    # leave images to nobody.
    todo = [i for i in range(rank, len(paths), world) if keyed.keys[i] not in keyed.store]
    if not todo:
        return 0
    encode = load_backend(model.encoder, backend, device, cache_dir)  # only made when something needs encoding
    log.info("encoding %d images with %s (%d already stored in %s)", len(todo), encode.name,
             len(paths) - len(todo), keyed.store.folder)
    keys, feats, maps, files, failed = [], [], [], [], []  # not yet written

    def flush():
        dim = model.config.feature_dim
        rows = torch.cat(feats) if feats else torch.zeros(0, dim)  # (N, D)
        spatial = (torch.cat(maps) if maps else torch.zeros(0, MAP_POSITIONS, dim, dtype=torch.float16)) \
            if keyed.spatial else None  # (N, P, D)
        keyed.store.write(keys, rows, files, failed, spatial=spatial, backend=keyed.backend,
                          weights=keyed.weights, version=FEATURE_CACHE_VERSION)
        for pending in (keys, feats, maps, files, failed):
            pending.clear()

    encoded = 0
    loader = image_loader([paths[i] for i in todo], batch_size=batch_size, num_workers=num_workers,
                          pin_memory=torch.device(device).type == "cuda")
    bar = tqdm(total=len(todo), desc="encoding images", unit="img")
    try:
        for idx, pixels, errors in loader:
            for j, err in errors.items():
                failed.append((keyed.keys[todo[j]], keyed.files[todo[j]], err))
            if pixels is not None:
                pooled, spatial = encode(pixels)
                feats.append(pooled.float().cpu())  # (B, D)
                if keyed.spatial:
                    maps.append(spatial.to("cpu", torch.float16))  # (B, P, D)
                keys.extend(keyed.keys[todo[j]] for j in idx)
                files.extend(keyed.files[todo[j]] for j in idx)
                encoded += len(idx)
            bar.update(len(idx) + len(errors))
            if len(keys) + len(failed) >= FLUSH_EVERY:
                flush()
    finally:  # interrupted or not, what was encoded is kept
        bar.close()
        if keys or failed:
            flush()
    return encoded


@torch.inference_mode()
def encode_missing(model, paths, device, cache_dir=DEFAULT_CACHE_DIR, batch_size=BATCH_SIZE, num_workers=None,
                   backend=DEFAULT_BACKEND, part=(0, 1), spatial=False):
    """Encode the images of `paths` that the store has neither a feature nor a decoding
    failure for, writing a new shard every FLUSH_EVERY images. part=(rank, world): only this
    rank's share, paths[rank::world] (multi-GPU: every rank encodes its share, a barrier, then
    every rank calls compute_features, which finds everything). -> number of images encoded."""
    rank, world = part
    if not 0 <= rank < world:
        raise ValueError(f"part {part}: want (rank, world) with 0 <= rank < world")
    if not paths:
        return 0
    keyed = _key_paths(model, paths, device, cache_dir, backend, spatial)
    return _encode(keyed, model, device, cache_dir, batch_size, num_workers, backend, part)


@torch.inference_mode()
def compute_features(model, paths, device, cache_dir=DEFAULT_CACHE_DIR, batch_size=BATCH_SIZE, num_workers=None,
                     backend=DEFAULT_BACKEND, spatial=False):
    """Pooled encoder features for `paths`, computed once with the encoder `backend` and kept
    in the feature store, keyed by image file (path, size, mtime), encoder weights and version,
    and backend. -> (features (N, D) float32 with zeros where the image failed, list of bool ok);
    with `spatial`, (features, maps (N, P, D) float16, ok)."""
    dim = model.config.feature_dim
    if not paths:
        empty = torch.zeros(0, dim)
        return (empty, torch.zeros(0, MAP_POSITIONS, dim, dtype=torch.float16), []) if spatial else (empty, [])
    keyed = _key_paths(model, paths, device, cache_dir, backend, spatial)
    _encode(keyed, model, device, cache_dir, batch_size, num_workers, backend, (0, 1))
    found = keyed.store.gather(keyed.keys, dim, spatial=(MAP_POSITIONS, dim) if spatial else None)
    ok = found[-1]
    bad = [i for i, good in enumerate(ok) if not good]
    if bad:
        error = keyed.store.failure(keyed.keys[bad[0]]) or "not in the feature store"
        log.warning("skipped %d unreadable images (e.g. %s: %s)", len(bad), paths[bad[0]], error)
    return found
