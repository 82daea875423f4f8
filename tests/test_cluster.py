"""`captioner caption --engine ray`: Ray Data on a small local Ray instance."""
import json
import sys

import pytest
from click.testing import CliRunner

from captioner.cli import main

ray = pytest.importorskip("ray", reason="the cluster extra (ray[data]) is not installed")


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance with 2 CPUs and a small object store, shut down after the module."""
    ray.init(num_cpus=2, object_store_memory=150 * 1024 * 1024, include_dashboard=False,
             logging_level="ERROR", configure_logging=False)
    yield
    ray.shutdown()


def run(*args):
    return CliRunner().invoke(main, ["caption", *map(str, args)])


def shard_records(folder):
    return [json.loads(line) for shard in sorted(folder.glob("*.json")) for line in shard.read_text().splitlines()]


def test_ray_run_equals_the_cli_and_resumes(local_ray, tmp_path, image_folder, trained_checkpoint):
    common = ["--weights", trained_checkpoint, "--backend", "torch"]
    cli = run(image_folder, *common, "--workers", 0)
    expected = {r["path"]: r for r in map(json.loads, cli.stdout.splitlines())}
    out = tmp_path / "out"
    result = run(image_folder, "--engine", "ray", "-o", out, *common)
    assert result.exit_code == 1, result.output  # broken files: error records, as the CLI
    assert "3 captioned, 3 failed" in result.output
    records = shard_records(out)
    assert sorted(r["path"] for r in records) == sorted(expected)  # one record per image
    for r in records:
        want = expected[r["path"]]
        if "error" in want:
            assert r["error"] == want["error"] and r["caption"] is None
        else:
            assert (r["caption"], r["score"], r["objects"], r["error"]) == \
                (want["caption"], want["score"], want["objects"], None)
    # A run stopped midway: drop some records and cut the last one short; --resume does the rest.
    shard = sorted(out.glob("*.json"))[0]
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    result = run(image_folder, "--engine", "ray", "-o", out, "--resume", *common)
    assert "2 already done" in result.output, result.output
    records = shard_records(out)
    assert sorted(r["path"] for r in records) == sorted(expected)  # each exactly once
    # Without --resume an output folder that holds shards is not overwritten.
    result = run(image_folder, "--engine", "ray", "-o", out, *common)
    assert result.exit_code == 1 and "use --resume" in result.output


def test_killed_ray_run_resumes_without_losing_or_duplicating(local_ray, tmp_path, photos, trained_checkpoint):
    """A Ray run killed with its whole process group (as a crash would), then resumed."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        list(photos.values())[i % 4].resize((160, 120)).save(folder / f"{i:03d}.jpg")
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("captioner")), "caption", str(folder), "--engine", "ray", "-o", str(out),
           "--batch-size", "4", "--weights", str(trained_checkpoint), "--backend", "torch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(shard_records(out) if out.exists() else []) < 8:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The cluster's workers are not in the driver's process group: a write task already
    # running may still finish its shard. Count once the folder has stopped changing.
    before, settled = len(shard_records(out)), time.monotonic()
    while time.monotonic() - settled < 3:
        time.sleep(0.2)
        if (now := len(shard_records(out))) != before:
            before, settled = now, time.monotonic()
    assert 8 <= before < 300, before  # stopped midway
    result = run(folder, "--engine", "ray", "-o", out, "--resume", "--weights", trained_checkpoint,
                 "--backend", "torch", "--batch-size", 4)
    assert result.exit_code == 0 and f"{300 - before} captioned" in result.output, result.output
    paths = [r["path"] for r in shard_records(out)]
    assert len(paths) == 300 and len(set(paths)) == 300  # every photo exactly once


def test_ray_parquet_and_files_from(local_ray, tmp_path, image_folder, trained_checkpoint):
    import pyarrow.parquet as pq

    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_folder / 'cat.jpg'}\n{image_folder / 'missing.jpg'}\n")
    out = tmp_path / "pq"
    result = run("--files-from", listing, "--engine", "ray", "-o", out, "--format", "parquet",
                 "--weights", trained_checkpoint, "--backend", "torch", "--beam-size", 2)
    assert result.exit_code == 1, result.output
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert rows[str(image_folder / "cat.jpg")]["caption"] == "a cat sits on the floor"
    assert json.loads(rows[str(image_folder / "cat.jpg")]["objects"])[0]["word"] == "cat"
    assert "no such file" in rows[str(image_folder / "missing.jpg")]["error"]


def test_ray_reads_and_writes_uris(local_ray, tmp_path, image_folder, trained_checkpoint):
    """Inputs and output as URIs (file:// here; s3:// and gs:// go through the same pyarrow filesystems)."""
    out = tmp_path / "uri-out"
    result = run(f"file://{image_folder}", "--engine", "ray", "-o", f"file://{out}", "--weights", trained_checkpoint,
                 "--backend", "torch")
    assert result.exit_code == 1, result.output
    records = {r["path"]: r for r in shard_records(out)}
    assert records[f"file://{image_folder}/cat.jpg"]["caption"] == "a cat sits on the floor"
    assert len(records) == 6 and "empty file" in records[f"file://{image_folder}/empty.jpg"]["error"]


def test_ray_option_errors(tmp_path, image_folder, monkeypatch):
    result = run(image_folder, "--engine", "ray", "-o", tmp_path / "o", "--format", "csv")
    assert result.exit_code == 1 and "jsonl or parquet" in result.output
    result = run(image_folder, "--engine", "ray", "-o", tmp_path / "o", "--actors", 0)
    assert result.exit_code == 2
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the cluster extra were not installed
    result = run(image_folder, "--engine", "ray", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "pip install 'captioner[cluster]'" in result.output


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_records_written_twice_are_dropped(tmp_path, fmt):
    """A killed run's workers can outlive its driver and write what the resumed run writes again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from captioner.cluster import drop_duplicates, read_shards

    for name, paths in (("a", ["x", "y"]), ("b", ["y", "z", "z"])):
        if fmt == "parquet":
            pq.write_table(pa.table({"path": paths}), tmp_path / f"{name}.parquet")
        else:
            (tmp_path / f"{name}.json").write_text("".join(json.dumps({"path": p}) + "\n" for p in paths))
    drop_duplicates(tmp_path, fmt)
    assert sorted(r["path"] for r in read_shards(tmp_path, fmt)) == ["x", "y", "z"]


def test_ray_confidence_and_min_confidence(local_ray, tmp_path, image_folder, calibrated_checkpoint):
    out = tmp_path / "withheld"
    result = run(image_folder / "cat.jpg", image_folder / "coffee.JPG", "--engine", "ray", "-o", out,
                 "--weights", calibrated_checkpoint, "--backend", "torch", "--min-confidence", 1.0)
    assert result.exit_code == 0, result.output
    records = shard_records(out)
    assert len(records) == 2  # every record kept, each caption withheld and marked
    assert all(r["caption"] is None and r["low_confidence"] and 0.0 <= r["confidence"] < 1.0 for r in records)
