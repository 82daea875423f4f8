"""The feature store's spatial maps (captioner/feature_store.py): written as float16 beside
the pooled features, gathered by shape, refused when misused or damaged, carried through
prune_store, reported by store_info. Small synthetic tensors, no images, no model."""
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from captioner import feature_store
from captioner.feature_store import STORE_DIR, FeatureStore, file_info, prune_store, store_info

P, D = 4, 6  # positions per map, feature size: small stand-ins for 49, 1280


def keys_of(start, n):
    return [f"{i:040x}" for i in range(start, start + n)]


def data(start, n):
    """Features (n, D) and maps (n, P, D) float32 of rows start..start+n, distinct per row."""
    g = torch.Generator().manual_seed(start)
    return torch.randn(n, D, generator=g), torch.randn(n, P, D, generator=g) * 10


def fake_files(n):
    return [("/nowhere/x.jpg", 1, 1)] * n


@pytest.fixture(params=["fancy", "runs"])
def copy_mode(request, monkeypatch):
    """Both ways gather copies rows: these rows are small, so "runs" (the way of 125 KB maps)
    is forced by lowering its threshold."""
    if request.param == "runs":
        monkeypatch.setattr(feature_store, "RUN_COPY_ROW_BYTES", 0)
    return request.param


@pytest.fixture
def images(tmp_path):
    """An image folder of 40 small files (prune keeps only entries whose file is unchanged)."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(40):
        (root / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    return root


def files_of(root, start, n):
    return [file_info(root / f"{i}.jpg") for i in range(start, start + n)]


def shards(cache):
    return sorted((cache / STORE_DIR).rglob("shard-*.safetensors"))


def test_features_and_maps_round_trip_as_float16(tmp_path, copy_mode):
    feats, maps = data(0, 5)
    FeatureStore(tmp_path / "c", tmp_path).write(keys_of(0, 5), feats, fake_files(5), spatial=maps, backend="t")
    with safe_open(str(shards(tmp_path / "c")[0]), "pt") as f:
        assert f.get_slice("spatial").get_dtype() == "F16" and f.get_slice("spatial").get_shape() == [5, P, D]
    store = FeatureStore(tmp_path / "c", tmp_path)  # read back from disk, not from the writer's memory
    got, got_maps, ok = store.gather(keys_of(0, 5), D, spatial=(P, D))
    assert ok == [True] * 5 and store.maps == [(P, D)]
    assert torch.equal(got, feats)  # features stay float32
    assert got_maps.dtype == torch.float16 and got_maps.shape == (5, P, D)
    assert torch.equal(got_maps, maps.half())  # exactly the fp16 rounding, nothing else


def test_gather_with_maps_zeroes_the_missing_keys(tmp_path, copy_mode):
    feats, maps = data(0, 8)
    store = FeatureStore(tmp_path / "c", tmp_path)
    store.write(keys_of(0, 3), feats[:3], fake_files(3), spatial=maps[:3])
    store.write(keys_of(3, 5), feats[3:], fake_files(5), spatial=maps[3:])
    rows = [4, None, 1, 4, None, 5, 6, 7, 0]  # None: not stored; 5, 6, 7 one stretch of a shard
    wanted = [keys_of(r, 1)[0] if r is not None else "f" * 40 for r in rows]
    got, got_maps, ok = FeatureStore(tmp_path / "c", tmp_path).gather(wanted, D, spatial=(P, D))
    assert ok == [r is not None for r in rows]
    zeros = torch.zeros(P, D, dtype=torch.float16)
    assert torch.equal(got_maps, torch.stack([zeros if r is None else maps[r].half() for r in rows]))
    assert torch.equal(got, torch.stack([torch.zeros(D) if r is None else feats[r] for r in rows]))


@pytest.mark.parametrize("bad", [torch.zeros(4, P, D), torch.zeros(5, P * D), torch.zeros(5, 1, P, D)])
def test_write_refuses_maps_that_do_not_fit_the_keys(tmp_path, bad):
    feats, _ = data(0, 5)
    store = FeatureStore(tmp_path / "c", tmp_path)
    with pytest.raises(ValueError, match="spatial maps of shape"):
        store.write(keys_of(0, 5), feats, fake_files(5), spatial=bad)
    assert shards(tmp_path / "c") == [] and len(store) == 0


def test_gather_refuses_maps_of_another_shape_naming_the_shard(tmp_path):
    feats, maps = data(0, 3)
    store = FeatureStore(tmp_path / "c", tmp_path)
    path = store.write(keys_of(0, 3), feats, fake_files(3), spatial=maps)
    with pytest.raises(ValueError) as err:
        store.gather(keys_of(0, 3), D, spatial=(P + 1, D))
    assert path.name in str(err.value) and f"{(P, D)}" in str(err.value) and f"{(P + 1, D)}" in str(err.value)
    _, _, ok = store.gather(["f" * 40], D, spatial=(P + 1, D))  # nothing found: nothing to refuse
    assert ok == [False]


def test_gather_with_maps_refuses_a_pooled_only_shard(tmp_path):
    feats, maps = data(0, 4)
    store = FeatureStore(tmp_path / "c", tmp_path)
    store.write(keys_of(0, 2), feats[:2], fake_files(2), spatial=maps[:2])
    pooled = store.write(keys_of(2, 2), feats[2:], fake_files(2))
    with pytest.raises(ValueError, match=f"{pooled.name} holds no spatial maps"):
        FeatureStore(tmp_path / "c", tmp_path).gather(keys_of(0, 4), D, spatial=(P, D))


def test_a_pooled_only_gather_reads_shards_with_maps(tmp_path):
    feats, maps = data(0, 4)
    store = FeatureStore(tmp_path / "c", tmp_path)
    store.write(keys_of(0, 2), feats[:2], fake_files(2), spatial=maps[:2])
    store.write(keys_of(2, 2), feats[2:], fake_files(2))
    result = FeatureStore(tmp_path / "c", tmp_path).gather(keys_of(0, 4), D)  # today's call, today's answer
    assert len(result) == 2
    got, ok = result
    assert ok == [True] * 4 and torch.equal(got, feats)


def has_maps(shard):
    with safe_open(str(shard), "pt") as f:
        return "spatial" in f.keys()


def test_prune_keeps_the_maps_in_shards_of_their_own(tmp_path, images, monkeypatch, copy_mode):
    cache = tmp_path / "c"
    feats, maps = data(0, 40)
    writer = FeatureStore(cache, images)
    for s in range(0, 40, 2):  # 20 shards of 2 rows: rows 0..19 with maps, 20..39 without
        spatial = maps[s:s + 2] if s < 20 else None
        writer.write(keys_of(s, 2), feats[s:s + 2], files_of(images, s, 2), spatial=spatial, backend="t")
    writer.write([], torch.zeros(0, D), [], [(keys_of(99, 1)[0], files_of(images, 0, 1)[0], "not an image")],
                 spatial=torch.zeros(0, P, D), backend="t")  # a failure recorded in a spatial shard
    reader = FeatureStore(cache, images)  # opened before prune: must find the new shards
    # a row with a map is 4*D + 2*P*D = 72 bytes here: a 360-byte limit gives 5 of them a
    # shard, while pooled-only rows (24 bytes) go by compact_rows
    monkeypatch.setattr(feature_store, "COMPACT_BYTES", 360)
    summary = prune_store(cache, compact_rows=8)
    assert summary["kept"] == 40 and summary["failed_kept"] == 1 and summary["dropped"] == 0
    assert summary["shards_before"] == 21 and summary["shards_after"] == 4 + 3  # 20 rows / 5, 20 rows / 8
    got, got_maps, ok = reader.gather(keys_of(0, 20), D, spatial=(P, D))
    assert all(ok) and torch.equal(got, feats[:20]) and torch.equal(got_maps, maps[:20].half())
    got, ok = reader.gather(keys_of(20, 20), D)
    assert all(ok) and torch.equal(got, feats[20:])
    assert keys_of(99, 1)[0] in reader.failed
    with_maps = [p for p in shards(cache) if has_maps(p)]
    assert len(with_maps) == 4
    for p in shards(cache):
        with safe_open(str(p), "pt") as f:
            assert f.get_slice("keys").get_shape()[0] <= (5 if p in with_maps else 8)
    assert prune_store(cache, compact_rows=8)["shards_after"] == 7  # already compact: left as it is
    assert len(shards(cache)) == 7


def test_shard_rows_limit_spatial_shards_by_bytes():
    pooled = feature_store._shard_rows(("t", "w", 1280, ()), feature_store.COMPACT_ROWS)
    spatial = feature_store._shard_rows(("t", "w", 1280, (49, 1280)), feature_store.COMPACT_ROWS)
    assert pooled == feature_store.COMPACT_ROWS
    row = 49 * 1280 * 2 + 1280 * 4  # a float16 map and a float32 feature
    assert spatial * row <= feature_store.COMPACT_BYTES < (spatial + 1) * row and spatial < pooled


@pytest.mark.parametrize("spatial", [torch.zeros(3, P, D), torch.zeros(2, P, D, dtype=torch.float16),
                                     torch.zeros(3, P * D, dtype=torch.float16)],
                         ids=["float32", "rows", "two-dim"])
def test_a_damaged_spatial_tensor_is_set_aside_like_any_damaged_shard(tmp_path, caplog, spatial):
    cache = tmp_path / "c"
    feats, maps = data(0, 6)
    store = FeatureStore(cache, tmp_path)
    good = store.write(keys_of(0, 3), feats[:3], fake_files(3), spatial=maps[:3])
    bad = good.with_name("shard-0-bad.safetensors")
    save_file({"keys": feature_store._key_tensor(keys_of(3, 3)), "features": feats[3:],
               "failed": torch.zeros(0, 20, dtype=torch.uint8), "spatial": spatial},
              str(bad), {"files": "[]", "failed": "[]"})
    with caplog.at_level(logging.WARNING, logger="captioner.feature_store"):
        store = FeatureStore(cache, tmp_path)
    assert "damaged feature shard" in caplog.text and "keys and features do not match" in caplog.text
    assert not bad.exists() and bad.with_name(bad.name + ".damaged").exists()
    _, got_maps, ok = store.gather(keys_of(0, 6), D, spatial=(P, D))
    assert ok == [True] * 3 + [False] * 3 and torch.equal(got_maps[:3], maps[:3].half())


def test_prune_removes_a_shard_whose_maps_are_damaged(tmp_path, images):
    cache = tmp_path / "c"
    feats, maps = data(0, 2)
    store = FeatureStore(cache, images)
    folder = store.write(keys_of(0, 1), feats[:1], files_of(images, 0, 1), spatial=maps[:1]).parent
    save_file({"keys": feature_store._key_tensor(keys_of(1, 1)), "features": feats[1:],
               "failed": torch.zeros(0, 20, dtype=torch.uint8), "spatial": maps[1:]},  # float32 maps
              str(folder / "shard-0-bad.safetensors"), {"files": "[]", "failed": "[]"})
    summary = prune_store(cache)
    assert summary["kept"] == 1 and summary["shards_after"] == 1 and len(shards(cache)) == 1
    _, got_maps, ok = FeatureStore(cache, images).gather(keys_of(0, 2), D, spatial=(P, D))
    assert ok == [True, False] and torch.equal(got_maps[0], maps[0].half())


def test_store_info_reports_the_maps(tmp_path):
    feats, maps = data(0, 5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    FeatureStore(tmp_path / "c", tmp_path / "a").write(keys_of(0, 3), feats[:3], fake_files(3), spatial=maps[:3])
    FeatureStore(tmp_path / "c", tmp_path / "a").write(keys_of(3, 2), feats[3:], fake_files(2))
    FeatureStore(tmp_path / "c", tmp_path / "b").write(keys_of(5, 2), feats[3:], fake_files(2))
    a, b = store_info(tmp_path / "c")
    assert (a["entries"], a["shards"], a["spatial"], a["spatial_entries"]) == (5, 2, True, 3)
    assert a["spatial_bytes"] == 3 * P * D * 2 and a["bytes"] > a["spatial_bytes"]
    assert (b["spatial"], b["spatial_entries"], b["spatial_bytes"]) == (False, 0, 0)
