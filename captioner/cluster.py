"""`captioner caption --engine ray`: caption millions of photos with Ray Data.

The plan is Ray Data's standard offline-inference shape: a dataset of paths, read and
preprocessed by CPU tasks (`read_and_preprocess`, so decoding scales with the cluster's
CPUs), captioned by a pool of actors that each load the model once (`CaptionActor`, which
wraps `Captioner`: the same preprocessing and decoding as the CLI), written as sharded
JSONL or Parquet files by Ray's own writers. Inputs are local paths or any URI pyarrow's
filesystems read (`s3://bucket/prefix`, `gs://...`); so is the output folder.

Resuming: the output folder's records are read first and every path already there is
skipped; a shard cut short by a killed run is repaired (its last, incomplete line
dropped, records.complete_lines) or, for Parquet, removed so that its photos are captioned
again.
"""
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from .options import DEFAULT_BACKEND, DecodeOptions
from .records import caption_record, complete_lines

log = logging.getLogger(__name__)
INSTALL_HINT = "--engine ray needs Ray Data: pip install 'captioner[cluster]' (or: pip install 'ray[data]')"
ACTOR_MEMORY = 1_000_000_000  # bytes Ray reserves for a model replica (its resident size, with room to spare)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


def _filesystem(uri_or_path):
    """(pyarrow filesystem, path in it, scheme prefix to put back on listed paths)."""
    import pyarrow.fs as pafs

    if "://" in uri_or_path:
        fs, path = pafs.FileSystem.from_uri(uri_or_path)
        return fs, path, uri_or_path.split("://", 1)[0] + "://"
    return pafs.LocalFileSystem(), os.path.abspath(uri_or_path), ""


def list_inputs(inputs, recursive=False):
    """[(path as recorded, where to read it)] for files and folders, local or remote.
    Local paths are recorded as given (like the plain CLI); a folder yields its images,
    sorted; a named file is kept whatever it is (a missing one gets an error record)."""
    import pyarrow.fs as pafs

    from .images import IMAGE_EXTENSIONS, find_images

    items = []
    for item in inputs:
        if "://" not in item:
            items += [(str(p), os.path.abspath(p)) for p in find_images([item], recursive)]
            continue
        fs, path, scheme = _filesystem(item)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
            items += [(scheme + f.path, scheme + f.path) for f in sorted(found, key=lambda f: f.path)
                      if f.type == pafs.FileType.File and Path(f.path).suffix.lower() in IMAGE_EXTENSIONS]
        else:
            items.append((item, item))
    return items


def _shards(output, suffix):
    import pyarrow.fs as pafs

    fs, path, _ = _filesystem(str(output))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return fs, []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return fs, sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(suffix))


def read_shards(output, fmt):
    """Every record in an output folder's shards, repairing shards that a killed run left
    cut short."""
    fs, shards = _shards(output, ".parquet" if fmt == "parquet" else ".json")
    records = []
    for shard in shards:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(shard, filesystem=fs)
            except Exception as e:  # written in part when the run stopped: its photos are done again
                log.warning("removing %s, an incomplete shard of an interrupted run (%s)", shard, e)
                fs.delete_file(shard)
                continue
            records += table.to_pylist()
            continue
        with fs.open_input_stream(shard) as f:
            data = f.read()
        complete = complete_lines(data, shard)
        if len(complete) < len(data):
            with fs.open_output_stream(shard) as f:
                f.write(complete)
        records += [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
    return records


def drop_duplicates(output, fmt):
    """Keep one record per path in an output folder, rewriting the shards that repeat one;
    -> the records kept.
    A killed run's Ray workers can outlive its driver for a few seconds and write shards
    that a resumed run writes again; this makes the folder hold each photo once."""
    fs, shards = _shards(output, ".parquet" if fmt == "parquet" else ".json")
    seen, records = set(), []

    def first_time(path):
        new = path not in seen
        seen.add(path)
        return new
    for shard in shards:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pq.read_table(shard, filesystem=fs)
            keep = [first_time(p) for p in table.column("path").to_pylist()]
            if not all(keep):
                table = table.filter(pa.array(keep))
                pq.write_table(table, shard, filesystem=fs)
            records += table.to_pylist()
            continue
        with fs.open_input_stream(shard) as f:
            lines = f.read().decode("utf-8").splitlines(keepends=True)
        rows = [json.loads(line) for line in lines]
        keep = [first_time(row["path"]) for row in rows]
        records += [row for row, k in zip(rows, keep, strict=True) if k]
        if not all(keep):
            log.warning("%s: dropping %d records written twice (by a run that was killed)", shard,
                        len(keep) - sum(keep))
            with fs.open_output_stream(shard) as f:
                f.write("".join(line for line, k in zip(lines, keep, strict=True) if k).encode("utf-8"))
    return records


def read_and_preprocess(batch):
    """Ray task: read and resize a batch of images. -> the batch with `pixels`
    (B, 3, 224, 224) uint8 (zeros where unreadable) and `error` ("" where fine)."""
    import pyarrow.fs as pafs

    from .encoder import IMAGE_SIZE
    from .images import ImageError, encoder_pixels, load_image

    pixels = np.zeros((len(batch["path"]), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors = []
    for i, source in enumerate(batch["source"]):
        try:
            if "://" in source:
                fs, path, _ = _filesystem(source)
                with fs.open_input_stream(path) as f:
                    data = f.read()
            else:
                data = source  # load_image reads local paths itself (and names what is wrong)
            # 224x224 uint8 here, in the reading task: a quarter of the bytes cross the object store
            pixels[i] = encoder_pixels(load_image(data)).numpy()
            errors.append("")
        except ImageError as e:
            errors.append(str(e))
        except (OSError, pafs.ArrowException) as e:
            errors.append(f"cannot read: {e}")
    return {"path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class CaptionActor:
    """Ray actor: one model replica, loaded once, captioning preprocessed batches."""

    def __init__(self, weights, backend, decode, device, chunk, min_confidence=None):
        import torch

        from .inference import Captioner

        if device == "cpu":  # Ray gives an actor its num_cpus as OMP_NUM_THREADS; torch may not read it
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.captioner = Captioner.from_pretrained(weights, device=device, backend=backend)
        self.min_confidence = min_confidence
        self.decode = DecodeOptions(**decode)
        self.chunk = chunk  # images per encoder call

    def __call__(self, batch):
        import torch

        from .images import scale_pixels

        errors = list(batch["error"])
        good = [i for i, e in enumerate(errors) if not e]
        pixels = scale_pixels(torch.from_numpy(batch["pixels"][good]))  # float, in the actor
        # Chunks, so that the encoder and the beam search overlap as in the CLI (caption_batches).
        chunks = [(good[s:s + self.chunk], pixels[s:s + self.chunk]) for s in range(0, len(good), self.chunk)]
        results = {}
        for rows, found in self.captioner.caption_batches(chunks, self.decode):
            results.update(zip(rows, found, strict=True))
        out = {name: [] for name in ("path", "caption", "score", "confidence", "low_confidence", "objects", "error")}
        for i, path in enumerate(batch["path"]):
            r = caption_record(path, results[i], self.min_confidence) if i in results else {"path": path}
            for name in ("path", "caption", "score", "confidence"):
                out[name].append(r.get(name))
            out["low_confidence"].append(r.get("low_confidence", False))
            out["objects"].append(json.dumps(r.get("objects", [])))  # JSON text: one Arrow type always
            out["error"].append(errors[i] or None)
        return out


def _objects_as_lists(df):
    """JSONL shards carry `objects` as a list, like the CLI's records."""
    df["objects"] = df["objects"].map(json.loads)
    return df


def caption_with_ray(inputs, output, fmt="jsonl", decode=None, recursive=False, resume=False, weights=None,
                     backend=DEFAULT_BACKEND, batch_size=32, actors=1, gpus_per_actor=0.0, address=None,
                     ray_init=None, min_confidence=None):
    """Caption `inputs` (paths or URIs) into sharded `fmt` files in the folder `output`.
    `address` joins a running cluster ("auto"); without it a local Ray instance starts
    (`ray_init`: extra ray.init arguments, e.g. num_cpus); captions under `min_confidence`
    are withheld (records.caption_record). -> {"captioned", "failed",
    "skipped", "seconds", "startup_seconds"}."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"--engine ray writes jsonl or parquet shards, not {fmt}")
    ray = import_ray()
    decode = decode or DecodeOptions()
    t0 = time.perf_counter()
    items = list_inputs(inputs, recursive)
    if not items:
        raise ValueError("no image files found")
    skipped = 0
    if resume:
        done = {r["path"] for r in read_shards(output, fmt)}
        skipped = sum(path in done for path, _ in items)
        items = [(path, source) for path, source in items if path not in done]
        log.info("--resume: %d of %d photos already in %s", skipped, skipped + len(items), output)
    elif _shards(output, ".parquet" if fmt == "parquet" else ".json")[1]:
        raise ValueError(f"{output} already holds caption shards; use --resume to continue that run")
    if not items:
        return {"captioned": 0, "failed": 0, "skipped": skipped, "seconds": 0.0, "startup_seconds": 0.0}
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **(ray_init or {}))
    startup = time.perf_counter() - t0
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    weights = str(Path(weights).resolve()) if weights else None  # actors may run elsewhere: no relative paths
    ds = ray.data.from_items([{"path": path, "source": source} for path, source in items],
                             override_num_blocks=max(1, min(len(items) // batch_size, 10_000)))
    # Decoding runs in CPU tasks over the cluster's cores.
    ds = ds.map_batches(read_and_preprocess, batch_size=batch_size, num_cpus=1)
    # Each actor takes eight chunks of half a batch at a time and overlaps the encoder of one
    # with the beam search of the one before, as the CLI does (benchmarks/caption_cluster.py
    # compares them). Declaring the memory a model replica needs also keeps Ray from fusing
    # the decoding tasks into the actor (it fuses maps whose resource requests are equal),
    # which would decode on the model's core.
    ds = ds.map_batches(CaptionActor, batch_size=4 * batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=gpus_per_actor, num_cpus=0 if gpus_per_actor else 1, memory=ACTOR_MEMORY,
                        fn_constructor_kwargs={"weights": weights, "backend": backend, "decode": decode.to_dict(),
                                               "device": device, "chunk": max(1, batch_size // 2),
                                               "min_confidence": min_confidence})
    out = str(output) if "://" in str(output) else os.path.abspath(output)
    light = {"num_cpus": 0.25}  # writing a few hundred bytes a record: leave the cores to decoding
    if fmt == "parquet":
        ds.write_parquet(out, ray_remote_args=light)
    else:
        ds.map_batches(_objects_as_lists, batch_format="pandas", **light).write_json(out, ray_remote_args=light)
    todo = {path for path, _ in items}
    written = [r for r in drop_duplicates(output, fmt) if r["path"] in todo]
    failed = sum(bool(r.get("error")) for r in written)
    return {"captioned": len(written) - failed, "failed": failed, "skipped": skipped,
            "seconds": time.perf_counter() - t0, "startup_seconds": startup}
