"""The feature store: pooled encoder features of image files (and, for an attention decoder,
their spatial maps), kept on disk per image folder so that each photo is encoded once
(features.py fills it; `captioner cache` tidies it).

The store is per image folder, sharded and append-only:

    <cache_dir>/feature-store/<FEATURE_CACHE_VERSION>/<folder name>-<hash of its path>/
        ROOT                                         the image folder this store is for
        shard-<time_ns>-<pid>-<random>.safetensors   one per write, never rewritten

A shard holds `keys` (N, 20) uint8, the sha1 digests of feature_key; `features` (N, D)
float32, the pooled feature of each image; and `failed` (M, 20) uint8, images that could not
be decoded, so that reruns do not try them again. A shard of images encoded for an attention
decoder also holds `spatial` (N, P, D) float16, the encoder's map of each image before pooling
(P = 49 positions, 7x7): float16 halves the disk, the largest part of such a store by far
(125 KB an image against 5 KB for its pooled feature), and the decoder converts to float32
itself. Rows of one shard all have a map or none do; gather(spatial=(P, D)) reads them. A
shard's metadata lists the files (real path, size, mtime_ns) behind its keys and failures,
which is what prune_store checks, and the backend and encoder weights that encoded them.

Why this shape: a single cache file has to be read whole and rewritten whole to add to it
(at COCO scale, hundreds of MB rewritten again and again while encoding), and two runs
writing it at once lose each other's work. Here a write adds a file under a name of its
own, reading an index reads the keys only, and gather() reads the rows it is asked for
straight from the memory-mapped shards into one preallocated tensor.
"""
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .encoder import ENCODER_NAME
from .machine import DEFAULT_CACHE_DIR, atomic_write

log = logging.getLogger(__name__)

# Bump when the encoder or `preprocess` changes, so stale cached features are not reused.
FEATURE_CACHE_VERSION = f"{ENCODER_NAME}-squash224-v2"
STORE_DIR = "feature-store"
COMPACT_ROWS = 16384  # rows per shard after prune_store (~84 MB at D=1280)
# Bytes per shard after prune_store, which caps the rows of shards with spatial maps
# (~8,200 rows at P=49, D=1280): prune builds each new shard in memory before saving it, so
# this is about its peak memory, and 120k images of maps still make only ~15 files.
COMPACT_BYTES = 1 << 30
# Rows at least this big (a map: 125 KB) are copied run by run, straight into the result:
# numpy's fancy indexing would first copy every row asked for from a shard into a temporary,
# up to a GB for a compacted shard of maps, and faulting in its fresh pages costs more than
# the copy. Smaller rows (a pooled feature: 5 KB) go by fancy indexing, fastest for many rows.
RUN_COPY_ROW_BYTES = 64 << 10
SPATIAL = "spatial"  # the tensor name of the maps in a shard
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2"}  # safetensors dtype -> numpy, for memory-mapping
KEY_BYTES = 20  # a sha1 digest
STALE_TMP_S = 3600  # a writer's temp file this old belongs to a process that died


# ---------------------------------------------------------------- keys

def feature_key(path, backend="torch", weights=""):
    """The store key of image file `path` encoded by `backend` with the encoder whose
    export.weights_hash is `weights`. Any change to the file (path, size, mtime), the
    backend, the encoder's weights or FEATURE_CACHE_VERSION gives a new key, so a new encode."""
    return file_key(*file_info(path), backend, weights)


def file_info(path):
    """-> (real path, size, mtime_ns): what a key says about the file."""
    real = os.path.realpath(path)
    stat = os.stat(real)  # a missing file raises FileNotFoundError
    return real, stat.st_size, stat.st_mtime_ns


def file_key(real, size, mtime_ns, backend, weights):
    """feature_key from file_info's (real path, size, mtime_ns), without a stat."""
    raw = f"{FEATURE_CACHE_VERSION}|{real}|{size}|{mtime_ns}|{backend}|{weights}"
    return hashlib.sha1(raw.encode()).hexdigest()


def dataset_id(root):
    """A readable, stable name for the store of image folder `root`: `<name>-<short hash>`."""
    root = os.path.realpath(root)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(root))[:40] or "root"
    return f"{name}-{hashlib.sha1(root.encode()).hexdigest()[:10]}"


def common_folder(real_paths):
    """The deepest folder that holds every one of `real_paths` (absolute paths)."""
    return os.path.commonpath({os.path.dirname(p) for p in real_paths})


def _nested(a, b):
    """True if folder a is b, or one of them holds the other."""
    a_, b_ = a.rstrip(os.sep) + os.sep, b.rstrip(os.sep) + os.sep
    return a_.startswith(b_) or b_.startswith(a_)


def _key_tensor(keys):
    """N hex keys -> (N, 20) uint8, the form safetensors can hold."""
    raw = b"".join(bytes.fromhex(k) for k in keys)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(-1, KEY_BYTES)


def _hex_keys(t):
    """(N, 20) uint8 -> N hex keys."""
    raw = t.numpy().tobytes()
    return [raw[i:i + KEY_BYTES].hex() for i in range(0, len(raw), KEY_BYTES)]


# ---------------------------------------------------------------- shards

def _write_shard(folder, keys, features, files, failed=(), spatial=None, **info):
    """Write one new shard to `folder`, atomically (temp file, then os.replace), 0644.
    `files`: per key (real path, size, mtime_ns); `failed`: (key, file, error) triples;
    `spatial`: None or the keys' maps (N, P, D); `info`: strings kept in its metadata
    (backend, weights). -> its path."""
    if not len(keys) == len(features) == len(files):
        raise ValueError(f"{len(keys)} keys, {len(features)} features and {len(files)} files")
    name = f"shard-{time.time_ns()}-{os.getpid()}-{os.urandom(4).hex()}.safetensors"  # unique per writer
    tensors = {"keys": _key_tensor(keys), "features": features.detach().float().cpu().contiguous(),
               "failed": _key_tensor([k for k, _, _ in failed])}
    if spatial is not None:
        tensors[SPATIAL] = _spatial_tensor(spatial, len(keys))
    metadata = {"files": json.dumps([list(f) for f in files]),
                "failed": json.dumps([[*f, err] for _, f, err in failed]), **info}
    path = Path(folder) / name
    with atomic_write(path) as tmp:  # a dot name: never matched by the shard pattern, so never half-read
        save_file(tensors, str(tmp), metadata)
    return path


def _check_spatial(maps, n):
    """Raise ValueError unless `maps` is (n, P, D), the maps of n keys."""
    if maps.dim() != 3 or len(maps) != n:
        raise ValueError(f"spatial maps of shape {tuple(maps.shape)} for {n} keys: want ({n}, P, D)")


def _spatial_tensor(maps, n):
    """The maps (n, P, D) of a shard's n rows as float16, the form they are stored in."""
    _check_spatial(maps, n)
    return maps.detach().to(device="cpu", dtype=torch.float16).contiguous()  # (n, P, D)


def _read_shard_keys(path):
    """-> (keys, failed keys, (P, D) of its maps or None) of a shard; raises on a damaged one."""
    with safe_open(str(path), "pt") as f:  # checks the header against the file's length
        keys, failed, _, maps = _checked(f)
    return keys, failed, maps


def _checked(f):
    """-> (keys, failed keys, D, (P, D) of its maps or None) of an open shard, after checking
    that its tensors agree with each other; raises ValueError if they do not."""
    keys, failed = f.get_tensor("keys"), f.get_tensor("failed")
    features = f.get_slice("features")
    n, dim = features.get_shape()
    if features.get_dtype() != "F32" or tuple(keys.shape) != (n, KEY_BYTES) or failed.shape[1:] != (KEY_BYTES,):
        raise ValueError("keys and features do not match")
    maps = None
    if SPATIAL in f.keys():
        spatial = f.get_slice(SPATIAL)
        shape = tuple(spatial.get_shape())
        if spatial.get_dtype() != "F16" or len(shape) != 3 or shape[0] != n:
            raise ValueError(f"keys and features do not match: {n} rows, spatial {shape} {spatial.get_dtype()}")
        maps = shape[1:]
    return _hex_keys(keys), _hex_keys(failed), dim, maps


def _mapped(f, names):
    """The tensors `names` of the shard open as `f`, as numpy arrays, memory-mapped: indexing
    one reads only those rows. The safetensors layout: an 8-byte little-endian header size,
    the JSON header, the data. (safe_open's get_tensor maps the file too, but indexing its
    tensor is much slower.)"""
    f.seek(0)
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    arrays = []
    for name in names:
        info = header[name]
        begin, _ = info["data_offsets"]
        arrays.append(np.memmap(f, dtype=_NUMPY_DTYPES[info["dtype"]], mode="r", offset=8 + size + begin,
                                shape=tuple(info["shape"])))
    return arrays


def _read_rows(path, rows, out, dst, maps=None):
    """out[dst] = the shard's feature rows `rows` (sorted, so pages are read in order), and
    maps[dst] = their spatial maps if `maps` is given."""
    names, targets = (["features"], [out]) if maps is None else (["features", SPATIAL], [out, maps])
    with open(path, "rb") as f:  # one open for all: views of the same file even if it is replaced meanwhile
        for src, target in zip(_mapped(f, names), targets, strict=True):
            _copy_rows(f, src, rows, target.numpy(), dst)


def _copy_rows(f, src, rows, dst_array, dst):
    """dst_array[dst] = src[rows], where src is mapped from the open file `f`."""
    # numpy, not torch's index_put: that one runs on torch's thread pool, which crawls on a
    # machine whose cores are busy (a DataLoader, another run)
    row_bytes = src.itemsize * math.prod(src.shape[1:])
    if row_bytes < RUN_COPY_ROW_BYTES:
        dst_array[dst] = src[rows]  # (len(rows), D)
        return
    runs = _runs(rows, dst)
    if hasattr(os, "posix_fadvise"):  # not on macOS
        # Ask for every run at once: faulting the mapped pages in one run after another waits
        # on the disk once per row (4x slower for rows scattered over a store not in memory).
        for row, _, n in runs:
            os.posix_fadvise(f.fileno(), src.offset + row * row_bytes, n * row_bytes, os.POSIX_FADV_WILLNEED)
    for row, place, n in runs:
        dst_array[place:place + n] = src[row:row + n]  # (n, P, D)


def _runs(rows, dst):
    """-> (row, place, n): the stretches where rows[i] and dst[i] both go up by one."""
    runs = []
    for row, place in zip(rows, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == row and runs[-1][1] + runs[-1][2] == place:
            runs[-1][2] += 1
        else:
            runs.append([row, place, 1])
    return runs


def _set_aside(damaged):
    """Move damaged shards out of the way (so that every later reader does not warn again)
    and warn once; their images count as missing and are encoded again."""
    for path, _ in damaged:
        try:
            os.replace(path, path.with_name(path.name + ".damaged"))
        except OSError:  # another process moved it first, or the cache is read-only: ignored all the same
            pass
    path, err = damaged[0]
    log.warning("ignoring %d damaged feature shard(s) in %s (e.g. %s: %s); their images will be encoded again",
                len(damaged), path.parent, path.name, err)


class FeatureStore:
    """The stored features of the images under folder `root`.

    Writes go to root's own store. Reads also see the stores of the folders above and below
    root: which store a photo went to depends on the photos it was encoded with (a val split
    in coco/val2014 alone, a train split spanning coco/), and a photo's store is always one
    of those, so it is found wherever it went. Opening reads the shards' keys only."""

    def __init__(self, cache_dir, root, version=FEATURE_CACHE_VERSION):
        self.base = Path(cache_dir) / STORE_DIR / version
        self.root = os.path.realpath(root)
        self.folder = self.base / dataset_id(self.root)
        self.shards = []  # shard files read, in the order read
        self.maps = []  # per shard, the (P, D) of its spatial maps, or None: it has none
        self.index = {}  # key -> (shard number, row)
        self.failed = {}  # key -> (shard number, place in its failed list): images that cannot be decoded
        self._bad = set()  # damaged shards that could not be moved aside
        self.refresh()

    def __len__(self):
        return len(self.index)

    def __contains__(self, key):
        """True if `key` has a feature or is a known decoding failure."""
        return key in self.index or key in self.failed

    def _folders(self):
        if not self.base.is_dir():
            return []
        found = []
        for folder in sorted(self.base.iterdir()):
            try:
                other = (folder / "ROOT").read_text()
            except OSError:
                other = None
            if folder == self.folder or (other and _nested(other, self.root)):
                found.append(folder)
        return found

    def refresh(self):
        """Read the shards written since the last look (by any process). If some shard read
        before is gone (prune_store compacted it), start over: its rows are in a new one."""
        present = [p for folder in self._folders() for p in sorted(folder.glob("shard-*.safetensors"))]
        if not set(self.shards) <= set(present):
            self.shards, self.maps, self.index, self.failed = [], [], {}, {}
        known = set(self.shards) | self._bad
        damaged = []
        for path in present:
            if path in known:
                continue
            try:
                keys, failed, maps = _read_shard_keys(path)
            except FileNotFoundError:  # compacted away since the listing
                continue
            except Exception as e:  # truncated by a crash or a full disk, or not a shard at all
                damaged.append((path, e))
                self._bad.add(path)
                continue
            self._add(path, keys, failed, maps)
        if damaged:
            _set_aside(damaged)

    def _add(self, path, keys, failed, maps):
        n = len(self.shards)
        self.shards.append(path)
        self.maps.append(maps)
        self.index.update((k, (n, row)) for row, k in enumerate(keys))
        self.failed.update((k, (n, j)) for j, k in enumerate(failed))

    def write(self, keys, features, files, failed=(), spatial=None, **info):
        """Append one shard: `keys` (N hex strings, feature_key), `features` (N, D) float32,
        `files` (N (real path, size, mtime_ns)); `failed`: (key, file, error) triples of
        images that could not be decoded; `spatial`: None, or the encoder's maps (N, P, D) of
        the keys, stored as float16. Earlier shards are never touched. -> its path."""
        if spatial is not None:
            _check_spatial(spatial, len(keys))  # before making any folder
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "ROOT").is_file():  # how other stores tell whether this one overlaps them
            with atomic_write(self.folder / "ROOT") as tmp:
                tmp.write_text(self.root)
        path = _write_shard(self.folder, keys, features, files, failed, spatial, **info)
        self._add(path, list(keys), [k for k, _, _ in failed], None if spatial is None else tuple(spatial.shape[1:]))
        return path

    def gather(self, keys, dim, spatial=None):
        """-> (features (N, dim) float32 of `keys`, zeros where one is not stored; N bools:
        stored). With `spatial` = (P, D): (features, maps (N, P, D) float16, bools), and a
        key stored without maps of that shape raises ValueError. Reads only the rows asked
        for, so memory stays near the result's size."""
        out = torch.empty(len(keys), dim)  # every row is written below: no need to zero 600 MB first
        maps = None if spatial is None else torch.empty(len(keys), *spatial, dtype=torch.float16)  # (N, P, D)
        if maps is not None and maps.dim() != 3:
            raise ValueError(f"spatial={spatial!r}: want (P, D)")
        found = [False] * len(keys)
        todo = list(range(len(keys)))
        for _ in range(2):
            todo = self._gather_into(out, maps, found, keys, todo)
            if not todo:
                break
            self.refresh()  # a shard vanished under us: prune_store moved its rows to a new one
        missing = [i for i, ok in enumerate(found) if not ok]
        if missing:
            out.numpy()[missing] = 0
            if maps is not None:
                maps.numpy()[missing] = 0
        return (out, found) if maps is None else (out, maps, found)

    def _gather_into(self, out, maps, found, keys, todo):
        wanted = defaultdict(list)  # shard number -> [(row, place in keys)]
        for i in todo:
            where = self.index.get(keys[i])
            if where is not None:
                wanted[where[0]].append((where[1], i))
        for shard in wanted if maps is not None else ():  # all checked before any is read
            self._check_maps(shard, tuple(maps.shape[1:]))
        missed = []
        for shard, pairs in wanted.items():
            pairs.sort()
            dst = [i for _, i in pairs]
            try:
                _read_rows(self.shards[shard], [r for r, _ in pairs], out, dst, maps)
            except FileNotFoundError:
                missed += dst
                continue
            for i in dst:
                found[i] = True
        return missed

    def _check_maps(self, shard, want):
        """Refuse to read maps of shape `want` (P, D) from a shard that holds none or others:
        callers key spatial entries apart from pooled ones, so this is misuse or a damaged cache."""
        have = self.maps[shard]
        if have != want:
            held = "no spatial maps" if have is None else f"spatial maps of shape {have}"
            raise ValueError(f"feature shard {self.shards[shard]} holds {held}, asked for maps of shape {want}")

    def failure(self, key):
        """The decoding error recorded for `key`, or None."""
        where = self.failed.get(key)
        if where is None:
            return None
        try:
            with safe_open(str(self.shards[where[0]]), "pt") as f:
                return json.loads(f.metadata()["failed"])[where[1]][-1]
        except (OSError, KeyError, IndexError, ValueError):
            return "unreadable (recorded by an earlier run)"


# ---------------------------------------------------------------- upkeep

def _size(path):
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _unchanged(file):
    path, size, mtime_ns = file
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return stat.st_size == size and stat.st_mtime_ns == mtime_ns


def prune_store(cache_dir=DEFAULT_CACHE_DIR, compact_rows=COMPACT_ROWS):
    """Tidy the feature cache in `cache_dir`: remove the single-file caches of earlier
    releases (features-*.safetensors) and the stores of other FEATURE_CACHE_VERSIONs; in each
    current store drop the entries whose image file changed or is gone (and duplicates), and
    rewrite its shards as few shards of up to `compact_rows` rows (fewer for rows with spatial
    maps: COMPACT_BYTES), rows with maps apart from rows without. New shards are written
    before the old ones are deleted, so a reader or writer running meanwhile loses nothing. A
    store whose image folder is missing altogether (an unmounted disk?) is left as it is.
    -> summary dict (entries kept / dropped, shards before / after, bytes freed, ...)."""
    cache_dir = Path(cache_dir)
    summary = {"stores": 0, "kept": 0, "dropped": 0, "failed_kept": 0, "shards_before": 0, "shards_after": 0,
               "bytes_freed": 0, "removed": [], "skipped": []}
    base = cache_dir / STORE_DIR
    old = sorted(cache_dir.glob("features-*.safetensors*"))  # a single-file cache, and its temp file
    old += [v for v in sorted(base.iterdir()) if v.name != FEATURE_CACHE_VERSION] if base.is_dir() else []
    for path in old:
        summary["bytes_freed"] += _size(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        summary["removed"].append(str(path))
    current = base / FEATURE_CACHE_VERSION
    for folder in sorted(current.iterdir()) if current.is_dir() else []:
        if folder.is_dir():
            _prune_one(folder, compact_rows, summary)
    return summary


def _prune_one(folder, compact_rows, summary):
    """Prune the store in `folder` (see prune_store), adding what was done to `summary`."""
    root = (folder / "ROOT").read_text() if (folder / "ROOT").is_file() else None
    if root and not os.path.isdir(root):
        log.warning("%s: its image folder %s is missing; left as it is", folder, root)
        summary["skipped"].append(str(folder))
        return
    before = _size(folder)
    _remove_leftovers(folder)
    shards = sorted(folder.glob("shard-*.safetensors"))
    live = _live_entries(shards)
    needed = sum(max(1, -(-len(live.kept[g]) // _shard_rows(g, compact_rows))) for g in live.groups())
    if live.dropped or len(live.read) > needed:
        after = len(_compact(folder, live, compact_rows))
        for shard in live.read:  # only now: until here every entry is in an old shard or a new one
            shard.unlink(missing_ok=True)
    else:
        after = len(live.read)
    if not live.seen and not any(folder.glob("shard-*.safetensors")) and not any(folder.glob(".*.tmp")):
        shutil.rmtree(folder, ignore_errors=True)  # nothing left (and no writer at work)
    failed_kept = sum(len(v) for v in live.failed.values())
    summary["stores"] += 1
    summary["kept"] += len(live.seen) - failed_kept
    summary["failed_kept"] += failed_kept
    summary["dropped"] += live.dropped
    summary["shards_before"] += len(shards)
    summary["shards_after"] += after
    summary["bytes_freed"] += before - (_size(folder) if folder.exists() else 0)


def _remove_leftovers(folder):
    """Delete the shards set aside as damaged, and temp files old enough that their writer
    must have died."""
    now = time.time()
    for junk in [*folder.glob("*.damaged"), *folder.glob(".*.tmp")]:
        if junk.suffix == ".damaged" or now - junk.stat().st_mtime > STALE_TMP_S:
            junk.unlink(missing_ok=True)


@dataclass
class _LiveEntries:
    """What prune keeps of one store: each key once, and only if its image file is unchanged."""
    read: list = field(default_factory=list)  # the shards read (a damaged one is deleted instead)
    # A group is (backend, weights, D, (P, D) of the maps or () for none): what one shard holds
    kept: dict = field(default_factory=lambda: defaultdict(list))  # group -> [(shard, row, key, file)]
    failed: dict = field(default_factory=lambda: defaultdict(list))  # group -> [(key, file, error)]
    seen: set = field(default_factory=set)  # keys kept, with a feature or as a failure
    dropped: int = 0  # entries left out: duplicates, and images changed or gone

    def take(self, key, file):
        """True if the entry of `key` for image `file` is kept (counted as dropped if not)."""
        if key in self.seen or not _unchanged(file):
            self.dropped += 1
            return False
        self.seen.add(key)
        return True

    def groups(self):
        return set(self.kept) | set(self.failed)


def _live_entries(shards):
    """Read the keys and metadata of `shards` (in order: the first shard holding a key keeps
    it) into a _LiveEntries; a damaged shard is deleted, nothing in it can be used."""
    live = _LiveEntries()
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata()
                keys, bad, dim, maps = _checked(f)
            files, bad_files = json.loads(meta["files"]), json.loads(meta["failed"])
        except FileNotFoundError:
            continue
        except Exception as e:  # damaged: nothing in it can be used
            log.warning("%s: damaged (%s); removed", shard, e)
            shard.unlink(missing_ok=True)
            continue
        live.read.append(shard)
        group = (meta.get("backend", ""), meta.get("weights", ""), dim, maps or ())  # () sorts with tuples
        for row, (key, file) in enumerate(zip(keys, files, strict=True)):
            if live.take(key, file):
                live.kept[group].append((shard, row, key, file))
        for key, (*file, err) in zip(bad, bad_files, strict=True):
            if live.take(key, file):
                live.failed[group].append((key, tuple(file), err))
    return live


def _shard_rows(group, compact_rows):
    """Rows per compacted shard of `group`: compact_rows, fewer if its rows' bytes (float32
    features, float16 maps) would pass COMPACT_BYTES."""
    _, _, dim, maps = group
    row_bytes = 4 * dim + (2 * math.prod(maps) if maps else 0)
    return max(1, min(compact_rows, COMPACT_BYTES // max(row_bytes, 1)))


def _compact(folder, live, compact_rows):
    """Write the entries of `live` to new shards in `folder`, up to _shard_rows rows each,
    per group, with the group's decoding failures in its first. -> paths."""
    written = []
    for group in sorted(live.groups()):
        entries, step = live.kept[group], _shard_rows(group, compact_rows)
        for start in range(0, max(len(entries), 1), step):
            chunk = entries[start:start + step]
            features, spatial = _rows_of(chunk, group)
            written.append(_write_shard(folder, [e[2] for e in chunk], features, [e[3] for e in chunk],
                                        live.failed[group] if start == 0 else (), spatial,
                                        backend=group[0], weights=group[1], version=FEATURE_CACHE_VERSION))
    return written


def _rows_of(entries, group):
    """The features (n, D) of `entries` ((shard, row, key, file) each) and their maps
    (n, P, D), None if `group` has none, read shard by shard."""
    _, _, dim, maps = group
    rows = torch.empty(len(entries), dim)  # (n, D)
    spatial = torch.empty(len(entries), *maps, dtype=torch.float16) if maps else None  # (n, P, D)
    by_shard = defaultdict(list)
    for j, (shard, row, _, _) in enumerate(entries):
        by_shard[shard].append((row, j))
    for shard, pairs in by_shard.items():
        _read_rows(shard, [r for r, _ in pairs], rows, [j for _, j in pairs], spatial)
    return rows, spatial


def store_info(cache_dir=DEFAULT_CACHE_DIR):
    """What the feature cache in `cache_dir` holds, from the shards' headers only: a list
    of {version, store, root, shards, entries, failed, bytes, spatial, spatial_entries,
    spatial_bytes}, where `spatial` says whether the store holds maps, `spatial_entries` how
    many images have one and `spatial_bytes` their share of `bytes`; the single-file caches
    of earlier releases appear with store "(single file)"."""
    cache_dir = Path(cache_dir)
    rows = [{"version": p.name[len("features-"):-len(".safetensors")], "store": "(single file)", "root": str(p),
             "shards": 1, "entries": None, "failed": None, "bytes": _size(p),
             "spatial": False, "spatial_entries": 0, "spatial_bytes": 0}  # those never held maps
            for p in sorted(cache_dir.glob("features-*.safetensors"))]
    base = cache_dir / STORE_DIR
    for folder in sorted(base.glob("*/*")) if base.is_dir() else []:
        if folder.is_dir():
            root = folder / "ROOT"
            rows.append({"version": folder.parent.name, "store": folder.name,
                         "root": root.read_text() if root.is_file() else "?", **_count_shards(folder),
                         "bytes": _size(folder)})
    return rows


def _count_shards(folder):
    """-> {shards, entries, failed, spatial, spatial_entries, spatial_bytes} of a store."""
    counts = dict.fromkeys(("shards", "entries", "failed", "spatial_entries", "spatial_bytes"), 0)
    for shard in sorted(folder.glob("shard-*.safetensors")):
        try:
            with safe_open(str(shard), "pt") as f:
                entries, failed = f.get_slice("keys").get_shape()[0], f.get_slice("failed").get_shape()[0]
                maps = f.get_slice(SPATIAL).get_shape() if SPATIAL in f.keys() else [0]  # (n, P, D)
        except Exception:  # damaged: counted by prune, not here
            continue
        counts["shards"] += 1
        counts["entries"] += entries
        counts["failed"] += failed
        counts["spatial_entries"] += maps[0]
        counts["spatial_bytes"] += 2 * math.prod(maps)  # float16
    return {**counts, "spatial": counts["spatial_entries"] > 0}
