"""`captioner caption` on folders of good and broken files."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PHOTO_CAPTIONS

from captioner.cli import main

GOOD = {"cat.jpg", "coffee.JPG", "rocket.png"}
BROKEN = {"empty.jpg", "random.png", "truncated.jpg"}
EXPECTED = {"cat.jpg": PHOTO_CAPTIONS["cat"], "coffee.JPG": PHOTO_CAPTIONS["coffee"],
            "rocket.png": PHOTO_CAPTIONS["rocket"]}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _by_name(records):
    return {Path(r["path"]).name: r for r in records}


def test_folder_with_good_and_broken_files(image_folder, trained_checkpoint):
    result = run("caption", image_folder, "--weights", trained_checkpoint, "--batch-size", 2, "--workers", 0)
    assert result.exit_code == 1
    records = _records(result.stdout)
    assert len(records) == 6  # one record per file, notes.txt not picked up
    assert [r["path"] for r in records] == sorted(r["path"] for r in records)  # in file order
    records = _by_name(records)
    assert set(records) == GOOD | BROKEN
    for name in BROKEN:
        assert set(records[name]) == {"path", "error"} and records[name]["error"]
    assert "empty" in records["empty.jpg"]["error"] and "not an image" in records["random.png"]["error"]
    for name in GOOD:
        assert set(records[name]) == {"path", "caption", "score", "objects"}
        assert records[name]["caption"] == EXPECTED[name] and isinstance(records[name]["score"], float)
    assert "3 of 6 files could not be captioned" in result.stderr


def test_all_good_exits_zero(image_folder, trained_checkpoint):
    for name in BROKEN:
        (image_folder / name).unlink()
    result = run("caption", image_folder, "--weights", trained_checkpoint, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert {n: r["caption"] for n, r in _by_name(_records(result.stdout)).items()} == EXPECTED
    assert "could not be captioned" not in result.stderr


def test_output_formats_and_output_file(tmp_path, image_folder, trained_checkpoint):
    files = [image_folder / "cat.jpg", image_folder / "empty.jpg"]
    common = ["--weights", trained_checkpoint, "--workers", 0]
    # csv to a file: format from the extension
    out = tmp_path / "out.csv"
    result = run("caption", *files, "--output", out, *common)
    assert result.exit_code == 1 and result.stdout == ""
    rows = list(csv.DictReader(out.open(newline="")))
    assert [Path(r["path"]).name for r in rows] == ["cat.jpg", "empty.jpg"]
    assert rows[0]["caption"] == PHOTO_CAPTIONS["cat"] and float(rows[0]["score"]) < 0 and rows[0]["error"] == ""
    assert rows[0]["objects"].startswith("cat (") and rows[1]["objects"] == ""
    assert rows[1]["caption"] == "" and "empty" in rows[1]["error"]
    # txt on stdout
    result = run("caption", *files, "--format", "txt", *common)
    assert result.stdout.splitlines() == [f"{files[0]}\t{PHOTO_CAPTIONS['cat']}", f"{files[1]}\tERROR: empty file"]
    # jsonl forced for a file whose extension says something else; --format beats the extension
    out = tmp_path / "records.txt"
    run("caption", *files, "--output", out, "--format", "jsonl", *common)
    records = _records(out.read_text())
    assert records[0]["caption"] == PHOTO_CAPTIONS["cat"] and "error" in records[1]
    # csv on stdout
    result = run("caption", files[0], "--format", "csv", *common)
    assert next(csv.reader(io.StringIO(result.stdout))) == ["path", "caption", "score", "objects", "error"]
    # --output in a folder that does not exist yet; one that cannot be made is a clear error
    result = run("caption", files[0], "--output", tmp_path / "new" / "dir" / "out.jsonl", *common)
    assert result.exit_code == 0 and _records((tmp_path / "new" / "dir" / "out.jsonl").read_text())[0]["caption"]
    result = run("caption", files[0], "--output", files[0] / "out.jsonl", *common)  # under a file
    assert result.exit_code == 1 and "Could not open file" in result.output
    # an unknown extension falls back to jsonl
    run("caption", files[0], "--output", tmp_path / "out.log", *common)
    assert _records((tmp_path / "out.log").read_text())[0]["caption"] == PHOTO_CAPTIONS["cat"]


def test_n_best_and_beam_options(image_folder, trained_checkpoint):
    cat = image_folder / "cat.jpg"
    result = run("caption", cat, "--weights", trained_checkpoint, "--n-best", 3)
    record = _records(result.stdout)[0]
    assert record["caption"] == PHOTO_CAPTIONS["cat"] and len(record["alternatives"]) == 2
    greedy = _records(run("caption", cat, "--weights", trained_checkpoint, "--beam-size", 1).stdout)[0]
    assert greedy["caption"] == PHOTO_CAPTIONS["cat"] and "alternatives" not in greedy
    short = _records(run("caption", cat, "--weights", trained_checkpoint, "--max-length", 2).stdout)[0]
    assert len(short["caption"].split()) <= 2


def test_recursive_and_explicit_files(image_folder, trained_checkpoint):
    sub = image_folder / "nested" / "deeper"
    sub.mkdir(parents=True)
    (image_folder / "cat.jpg").rename(sub / "CAT.JPEG")
    flat = _by_name(_records(run("caption", image_folder, "--weights", trained_checkpoint).stdout))
    deep = _by_name(_records(run("caption", image_folder, "-r", "--weights", trained_checkpoint).stdout))
    assert set(flat) == GOOD - {"cat.jpg"} | BROKEN
    assert set(deep) == set(flat) | {"CAT.JPEG"} and deep["CAT.JPEG"]["caption"] == PHOTO_CAPTIONS["cat"]
    # A file named explicitly is captioned (or reported) whatever its extension.
    result = run("caption", image_folder / "notes.txt", sub / "CAT.JPEG", "--weights", trained_checkpoint)
    records = _records(result.stdout)
    assert result.exit_code == 1 and "not an image" in records[0]["error"] and records[1]["caption"]


@pytest.mark.parametrize("args,message", [
    (["{tmp}/missing"], "does not exist"),
    (["{tmp}", "--format", "xml"], "'xml' is not one of"),
    (["{tmp}", "--beam-size", "0"], "--beam-size"),
    (["{tmp}", "--beam-size", "2", "--n-best", "3"], "must not exceed beam_size"),
    (["{tmp}", "--n-best", "6"], "--n-best"),
    (["{tmp}", "--max-length", "51"], "--max-length"),
    (["{tmp}", "--concept-threshold", "2"], "--concept-threshold"),
    (["{tmp}", "--weights", "{tmp}/missing.safetensors"], "does not exist"),
    (["{tmp}"], "no image files found"),  # an empty folder
    ([], "Missing argument"),
])
def test_usage_errors_exit_2(tmp_path, trained_checkpoint, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if "--weights" not in args and args:
        args += ["--weights", str(trained_checkpoint)]
    result = run("caption", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_bad_weights_is_a_clear_error(tmp_path, image_folder):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = run("caption", image_folder, "--weights", bad)
    assert result.exit_code == 1 and "not a readable safetensors checkpoint" in result.output
    assert result.stdout == "" and "Error" in result.stderr  # no records were written


def test_installed_entry_point(tmp_path, image_folder, trained_checkpoint):
    """The real `captioner` script, its exit status and its streams, in a subprocess."""
    script = Path(sys.executable).with_name("captioner")
    if not script.exists():
        pytest.skip("captioner script not installed (pip install -e .)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(script), "caption", str(image_folder / "cat.jpg"), str(image_folder / "empty.jpg"),
                           "--weights", str(trained_checkpoint), "--format", "txt", "--workers", "0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("\t" + PHOTO_CAPTIONS["cat"]) and lines[1].endswith("\tERROR: empty file")
    assert "1 of 2 files could not be captioned" in proc.stderr


def test_objects_and_grounding_switch(image_folder, tiny_checkpoint):
    """An untrained model says "cat" only when grounding makes it; objects are listed either way."""
    cat = image_folder / "cat.jpg"
    grounded = _records(run("caption", cat, "--weights", tiny_checkpoint).stdout)[0]
    plain = _records(run("caption", cat, "--weights", tiny_checkpoint, "--no-grounding").stdout)[0]
    assert grounded["objects"][0]["word"] == "cat" and grounded["objects"][0]["p"] >= 0.5
    assert plain["objects"] == grounded["objects"]
    assert "cat" in grounded["caption"].split() and "cat" not in plain["caption"].split()
    # a threshold above every concept's probability: nothing detected, nothing forced
    none = _records(run("caption", cat, "--weights", tiny_checkpoint, "--concept-threshold", 1).stdout)[0]
    assert none["objects"] == [] and none["caption"] == plain["caption"]
