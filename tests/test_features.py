"""The feature store (captioner/feature_store.py, filled by captioner/features.py): encode
once, append-only shards, concurrent writers, damaged shards, rank shares, pruning, and
`captioner cache`."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from captioner import feature_store
from captioner import features as fs
from captioner.cli import main
from captioner.feature_store import FEATURE_CACHE_VERSION, STORE_DIR, FeatureStore, feature_key, prune_store
from captioner.features import compute_features, encode_missing
from captioner.images import load_image, preprocess

NAMES = ["cat", "coffee", "rocket", "astronaut"]


@pytest.fixture(autouse=True)
def one_thread():
    """Encode with one torch thread: a few images gain nothing from two, and on a machine
    whose cores are busy torch's thread pool makes these tests ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def paths(photo_files):
    """The four photos and one file that is no image, in one folder."""
    (photo_files / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return [photo_files / f"{n}.jpg" for n in NAMES] + [photo_files / "broken.jpg"]


def features_of(model, paths, cache, **kw):
    return compute_features(model, paths, torch.device("cpu"), cache, num_workers=0, backend="torch", **kw)


def encode(model, paths, cache, **kw):
    return encode_missing(model, paths, torch.device("cpu"), cache, num_workers=0, backend="torch", **kw)


def shards(cache):
    return sorted((Path(cache) / STORE_DIR).rglob("shard-*.safetensors"))


def test_roundtrip_and_a_second_call_encodes_nothing(tmp_path, tiny_model, paths, caplog):
    with caplog.at_level(logging.WARNING, logger="captioner.features"):
        first, ok = features_of(tiny_model, paths, tmp_path)
    assert ok == [True] * 4 + [False]
    assert "skipped 1 unreadable images" in caplog.text and "broken.jpg" in caplog.text
    fresh = tiny_model.encoder(torch.stack([preprocess(load_image(p)) for p in paths[:4]]))
    torch.testing.assert_close(first[:4], fresh, rtol=1e-4, atol=1e-4)
    assert first.dtype == torch.float32 and not first[4].any()  # zeros where the image failed

    written = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(tmp_path)}
    assert len(written) == 1
    assert encode(tiny_model, paths, tmp_path) == 0  # the failure is remembered too: nothing retried
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioner.features"):
        again, ok_again = features_of(tiny_model, paths, tmp_path)
    assert torch.equal(again, first) and ok_again == ok
    assert "broken.jpg: cannot" in caplog.text  # the recorded error, not a vague one
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(tmp_path)} == written  # untouched
    assert oct(shards(tmp_path)[0].stat().st_mode & 0o777) == "0o644"
    assert list(shards(tmp_path)[0].parent.glob(".*.tmp")) == []


def test_new_images_append_a_shard_and_a_changed_image_is_encoded_again(tmp_path, tiny_model, paths, photos):
    assert encode(tiny_model, paths[:2], tmp_path) == 2
    first = shards(tmp_path)
    assert encode(tiny_model, paths[:4], tmp_path) == 2  # only the two new ones
    assert len(shards(tmp_path)) == 2 and set(first) <= set(shards(tmp_path))

    photos["rocket"].save(paths[0], quality=90)  # cat.jpg now shows the rocket
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    assert encode(tiny_model, paths[:4], tmp_path) == 1
    feats, _ = features_of(tiny_model, paths[:4], tmp_path)
    torch.testing.assert_close(feats[0], feats[2], rtol=1e-4, atol=1e-4)


def test_an_other_encoder_gets_its_own_features(tmp_path, tiny_model, paths):
    assert encode(tiny_model, paths[:1], tmp_path) == 1
    tuned = type(tiny_model)(tiny_model.config)
    tuned.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        tuned.encoder._fc.weight.add_(0.01)  # any weight change: another hash, another key
    assert feature_key(paths[0], "torch", "a") != feature_key(paths[0], "torch", "b")
    assert encode(tuned, paths[:1], tmp_path) == 1


def test_an_interrupted_run_keeps_what_it_encoded(tmp_path, tiny_model, paths, monkeypatch):
    real = fs.load_backend
    calls = []

    def failing_backend(*args, **kw):
        encoder = real(*args, **kw)

        def run(pixels):
            calls.append(len(pixels))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return encoder(pixels)
        run.name = encoder.name
        return run

    monkeypatch.setattr(fs, "load_backend", failing_backend)
    monkeypatch.setattr(fs, "FLUSH_EVERY", 1)  # a shard after every batch
    with pytest.raises(KeyboardInterrupt):
        encode(tiny_model, paths[:4], tmp_path, batch_size=2)
    assert len(shards(tmp_path)) == 1
    monkeypatch.setattr(fs, "load_backend", real)
    assert encode(tiny_model, paths[:4], tmp_path, batch_size=2) == 2  # only the batch that was lost


def test_parts_split_the_work_without_overlap(tmp_path, tiny_model, paths):
    done = [encode(tiny_model, paths, tmp_path, part=(rank, 3)) for rank in range(3)]
    assert sum(done) == 4  # 5 paths, one unreadable: each image encoded by exactly one rank
    store = FeatureStore(tmp_path, paths[0].parent)
    assert len(store) == 4 and len(store.failed) == 1
    assert encode(tiny_model, paths, tmp_path) == 0  # the union is complete
    with pytest.raises(ValueError):
        encode(tiny_model, paths, tmp_path, part=(2, 2))


def test_a_damaged_shard_is_set_aside_and_encoded_again(tmp_path, tiny_model, paths, caplog):
    first, _ = features_of(tiny_model, paths, tmp_path)
    (shard,) = shards(tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a crash or a full disk
    with caplog.at_level(logging.WARNING, logger="captioner.feature_store"):
        again, ok = features_of(tiny_model, paths, tmp_path)
    assert "damaged feature shard" in caplog.text
    torch.testing.assert_close(again, first)
    assert ok == [True] * 4 + [False]
    assert (shard.parent / (shard.name + ".damaged")).is_file() and not shard.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioner.feature_store"):
        features_of(tiny_model, paths, tmp_path)
    assert "damaged feature shard" not in caplog.text  # warned once


ROUNDS, ROWS = 20, 10


def write_rounds(cache, root, name, ready=None, go=None):
    """Write ROUNDS shards of ROWS synthetic rows to the store of `root`, re-reading the
    store after each; with `go`, first touch `ready` and wait for the file `go`."""
    store = FeatureStore(cache, root)
    if ready:
        Path(ready).touch()
    while go and not Path(go).exists():
        time.sleep(0.005)
    for r in range(ROUNDS):
        keys = [f"{name}{r:03d}{i:03d}".encode().hex().ljust(40, "0") for i in range(ROWS)]
        store.write(keys, torch.full((ROWS, 8), float(r)), [(f"/x/{k}", 1, 1) for k in keys], backend="test")
        store.refresh()


def test_two_processes_writing_at_once_keep_all_entries(tmp_path):
    cache, root, ready, go = tmp_path / "cache", tmp_path / "images", tmp_path / "ready", tmp_path / "go"
    root.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_features import write_rounds; "
            f"write_rounds(*sys.argv[1:])")
    child = subprocess.Popen([sys.executable, "-c", code, str(cache), str(root), "bb", str(ready), str(go)])
    deadline = time.monotonic() + 60
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()
    write_rounds(cache, root, "aa")  # this process writes at the same time
    assert child.wait(timeout=60) == 0
    store = FeatureStore(cache, root)
    assert len(store) == 2 * ROUNDS * ROWS and len(store.shards) == 2 * ROUNDS
    feats, ok = store.gather(list(store.index), 8)
    assert all(ok) and feats.shape == (2 * ROUNDS * ROWS, 8)


def test_gather_reads_the_rows_asked_for_from_every_overlapping_store(tmp_path):
    top, sub = tmp_path / "coco", tmp_path / "coco" / "val"
    sub.mkdir(parents=True)
    rows = torch.arange(60, dtype=torch.float32).view(20, 3)  # (20, 3)
    keys = [f"{i:040x}" for i in range(20)]
    FeatureStore(tmp_path / "c", top).write(keys[:10], rows[:10], [("/f", 1, 1)] * 10)
    FeatureStore(tmp_path / "c", sub).write(keys[10:], rows[10:], [("/f", 1, 1)] * 10)
    (tmp_path / "other").mkdir()
    FeatureStore(tmp_path / "c", tmp_path / "other").write([f"{99:040x}"], torch.ones(1, 3), [("/f", 1, 1)])
    store = FeatureStore(tmp_path / "c", sub)  # sees coco/ above it, not other/
    wanted = [keys[17], keys[3], "f" * 40, keys[4], keys[3], f"{99:040x}"]
    feats, ok = store.gather(wanted, 3)
    assert ok == [True, True, False, True, True, False]
    assert torch.equal(feats, torch.stack([rows[17], rows[3], torch.zeros(3), rows[4], rows[3], torch.zeros(3)]))


def test_prune_drops_stale_entries_compacts_and_removes_old_caches(tmp_path, tiny_model, paths):
    cache = tmp_path / "cache"
    for i in range(5):  # a shard per image
        features_of(tiny_model, paths[i:i + 1], cache)
    before, _ = features_of(tiny_model, paths, cache)
    old = cache / f"features-{FEATURE_CACHE_VERSION}.safetensors"  # today's single-file cache
    save_file({"k": torch.zeros(3)}, str(old))
    other = cache / STORE_DIR / "some-older-encoder" / "x-123"
    other.mkdir(parents=True)
    (other / "shard-1.safetensors").write_bytes(b"0" * 1000)
    paths[1].unlink()  # gone
    paths[2].write_bytes(paths[3].read_bytes())  # changed
    summary = prune_store(cache)
    assert summary["kept"] == 2 and summary["failed_kept"] == 1 and summary["dropped"] == 2
    assert summary["shards_before"] == 5 and summary["shards_after"] == 1
    assert not old.exists() and not other.parent.exists() and len(summary["removed"]) == 2
    assert summary["bytes_freed"] > 1000
    assert len(shards(cache)) == 1
    assert encode(tiny_model, [paths[0], paths[3], paths[4]], cache) == 0  # kept: the two, and the failure
    after, ok = features_of(tiny_model, [paths[0], paths[3]], cache)
    assert torch.equal(after, before[[0, 3]]) and all(ok)
    assert encode(tiny_model, [paths[2]], cache) == 1
    assert prune_store(cache)["shards_after"] == 1  # compacts the new shard in


def test_a_reader_survives_prune_compacting_under_it(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    files = []
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(b"x" * (i + 1))
        files.append(feature_store.file_info(root / f"{i}.jpg"))
    keys = [f"{i:040x}" for i in range(4)]
    writer = FeatureStore(tmp_path / "c", root)
    for i in range(4):
        writer.write(keys[i:i + 1], torch.full((1, 2), float(i)), files[i:i + 1])
    reader = FeatureStore(tmp_path / "c", root)
    assert prune_store(tmp_path / "c")["shards_after"] == 1
    feats, ok = reader.gather(keys, 2)  # its shards are gone: it finds the compacted one
    assert all(ok) and feats[:, 0].tolist() == [0, 1, 2, 3]


def test_cache_commands(tmp_path, tiny_model, paths):
    cache = tmp_path / "cache"
    features_of(tiny_model, paths[:2], cache)
    features_of(tiny_model, paths[2:], cache)
    result = CliRunner().invoke(main, ["cache", "info", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert "photos-" in result.output and "4 features, 1 unreadable, 2 shard(s)" in result.output
    paths[0].unlink()
    result = CliRunner().invoke(main, ["cache", "prune", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert "kept 3 features and 1 known-unreadable images, dropped 1; shards 2 -> 1" in result.output
    result = CliRunner().invoke(main, ["cache", "info", "--cache-dir", str(cache)])
    assert "3 features, 1 unreadable, 1 shard(s)" in result.output


def test_cache_help_does_not_load_torch():
    code = ("import sys; from click.testing import CliRunner; from captioner.cli import main; "
            "r = CliRunner().invoke(main, ['cache', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'prune' in r.output and 'info' in r.output; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
