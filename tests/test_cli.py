"""`captioner caption` on folders of good and broken files."""
import csv
import json

from click.testing import CliRunner

from captioner.cli import main

BROKEN = {"empty.jpg", "random.png", "truncated.jpg"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_folder_with_good_and_broken_files(image_folder, tiny_checkpoint):
    result = run("caption", image_folder, "--weights", tiny_checkpoint, "--batch-size", 2, "--workers", 0)
    assert result.exit_code == 1
    records = {r["path"].rsplit("/", 1)[-1]: r for r in _records(result.stdout)}
    assert set(records) == {"cat.jpg", "coffee.JPG", "rocket.png"} | BROKEN
    for name in BROKEN:
        assert records[name]["error"] and "caption" not in records[name]
    for name in ("cat.jpg", "coffee.JPG", "rocket.png"):
        assert records[name]["caption"] and isinstance(records[name]["score"], float)
    assert "3 of 6 files could not be captioned" in result.stderr


def test_all_good_exits_zero_and_writes_each_format(tmp_path, image_folder, tiny_checkpoint):
    for name in BROKEN:
        (image_folder / name).unlink()
    out = tmp_path / "out.csv"
    result = run("caption", image_folder, "--weights", tiny_checkpoint, "--output", out, "--workers", 1)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["cat.jpg", "coffee.JPG", "rocket.png"]
    assert all(r["caption"] and not r["error"] for r in rows)
    result = run("caption", image_folder / "cat.jpg", "--weights", tiny_checkpoint, "--format", "txt",
                 "--beam-size", 1)
    assert result.exit_code == 0 and result.stdout.startswith(str(image_folder / "cat.jpg") + "\t")
    result = run("caption", image_folder / "cat.jpg", "--weights", tiny_checkpoint, "--n-best", 3)
    assert len(_records(result.stdout)[0]["alternatives"]) == 2


def test_recursive(image_folder, tiny_checkpoint):
    sub = image_folder / "nested"
    sub.mkdir()
    (image_folder / "cat.jpg").rename(sub / "cat.jpg")
    flat = _records(run("caption", image_folder, "--weights", tiny_checkpoint).stdout)
    deep = _records(run("caption", image_folder, "--recursive", "--weights", tiny_checkpoint).stdout)
    assert len(deep) == len(flat) + 1 and any(r["path"].endswith("nested/cat.jpg") for r in deep)


def test_usage_errors_exit_2(tmp_path, tiny_checkpoint):
    assert run("caption", tmp_path / "missing").exit_code == 2
    assert run("caption", tmp_path, "--format", "xml").exit_code == 2
    assert run("caption", tmp_path, "--beam-size", 0).exit_code == 2
    result = run("caption", tmp_path, "--weights", tiny_checkpoint)  # empty folder
    assert result.exit_code == 2 and "no image files found" in result.output


def test_bad_weights_is_a_clear_error(tmp_path, image_folder):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = run("caption", image_folder, "--weights", bad)
    assert result.exit_code == 1 and "not a readable safetensors checkpoint" in result.output
