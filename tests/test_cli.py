"""`captioner caption` on folders of good and broken files."""
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PHOTO_CAPTIONS, image_bytes
from PIL import Image
from test_images import photo_server
from test_xmp import descriptions

from captioner.cli import main
from captioner.records import sentence_case
from captioner.xmp import sidecar_path

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
        assert set(records[name]) == {"path", "caption", "score", "confidence", "objects"}
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
    assert next(csv.reader(io.StringIO(result.stdout))) == [
        "path", "caption", "score", "confidence", "objects", "error"]
    # --output in a folder that does not exist yet; one that cannot be made is a clear error
    result = run("caption", files[0], "--output", tmp_path / "new" / "dir" / "out.jsonl", *common)
    assert result.exit_code == 0 and _records((tmp_path / "new" / "dir" / "out.jsonl").read_text())[0]["caption"]
    result = run("caption", files[0], "--output", files[0] / "out.jsonl", *common)  # under a file
    assert result.exit_code == 3 and "cannot write" in result.output  # 3: an output error
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
    (["{tmp}", "--n-best", "2", "--format", "csv"], "only jsonl records hold alternatives"),
    (["{tmp}", "--n-best", "2", "--format", "txt"], "only jsonl records hold alternatives"),
    (["{tmp}", "--max-length", "51"], "--max-length"),
    (["{tmp}", "--concept-threshold", "2"], "--concept-threshold"),
    (["{tmp}", "--weights", "{tmp}/missing.safetensors"], "does not exist"),
    (["{tmp}"], "no image files found"),  # an empty folder
    ([], "give image files or folders"),
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


@pytest.fixture
def many_photos(tmp_path, photos):
    """A folder of 48 small JPEGs (the four photos, repeated), for runs long enough to kill."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(48):
        list(photos.values())[i % 4].resize((160, 120)).save(folder / f"img_{i:03d}.jpg")
    return folder


def test_killed_run_resumes_and_captions_every_file_once(tmp_path, many_photos, trained_checkpoint):
    script = Path(sys.executable).with_name("captioner")
    if not script.exists():
        pytest.skip("captioner script not installed (pip install -e .)")
    out = tmp_path / "out.jsonl"
    cmd = [str(script), "caption", str(many_photos), "-o", str(out), "--weights", str(trained_checkpoint),
           "--batch-size", "2", "--workers", "0", "--backend", "torch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no clean-up, as in a crash
    proc.wait()
    before = out.read_text().count("\n")
    assert 6 <= before < 48, before  # stopped midway
    with open(out, "a") as f:
        f.write('{"path": "half a rec')  # the crash cut a record short
    result = run("caption", many_photos, "-o", out, "--resume", "--weights", trained_checkpoint,
                 "--workers", 0, "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert f"{before} of 48 files already in {out}" in result.stderr
    records = _records(out.read_text())
    paths = [r["path"] for r in records]
    assert len(paths) == 48 and set(paths) == {str(p) for p in many_photos.iterdir()}  # each exactly once
    assert all(r["caption"] in PHOTO_CAPTIONS.values() for r in records)
    result = run("caption", many_photos, "-o", out, "--resume", "--weights", trained_checkpoint, "--workers", 0)
    assert result.exit_code == 0 and "all 48 files are already captioned" in result.stderr  # nothing left to do
    assert len(_records(out.read_text())) == 48


@pytest.mark.parametrize("fmt", ["csv", "txt"])
def test_resume_other_formats(tmp_path, image_folder, trained_checkpoint, fmt):
    out = tmp_path / f"out.{fmt}"
    common = ["--weights", trained_checkpoint, "--workers", 0]
    run("caption", image_folder / "cat.jpg", image_folder / "empty.jpg", "-o", out, *common)
    first = out.read_text()
    run("caption", image_folder, "-o", out, "--resume", *common)
    text = out.read_text()
    assert text.startswith(first)
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == ["path", "caption", "score", "confidence", "objects", "error"] and rows.count(rows[0]) == 1
        paths = [r[0] for r in rows[1:]]
    else:
        paths = [line.split("\t")[0] for line in text.splitlines()]
    assert sorted(paths) == sorted(str(image_folder / n) for n in GOOD | BROKEN)


def test_files_from_a_list_and_stdin(tmp_path, image_folder, trained_checkpoint):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_folder / 'cat.jpg'}\n\n{image_folder / 'nope.jpg'}\n{image_folder}/rocket.png\n")
    common = ["--weights", trained_checkpoint, "--workers", 0, "--format", "txt"]
    result = run("caption", "--files-from", listing, *common)
    assert result.exit_code == 1  # nope.jpg is listed but missing: an error record, the rest captioned
    lines = result.stdout.splitlines()
    assert lines == [f"{image_folder / 'cat.jpg'}\t{PHOTO_CAPTIONS['cat']}",
                     f"{image_folder / 'nope.jpg'}\tERROR: no such file: {image_folder / 'nope.jpg'}",
                     f"{image_folder}/rocket.png\t{PHOTO_CAPTIONS['rocket']}"]
    result = CliRunner().invoke(main, ["caption", "--files-from", "-", *map(str, common)],
                                input=f"{image_folder / 'coffee.JPG'}\n")
    assert result.exit_code == 0 and result.stdout == f"{image_folder / 'coffee.JPG'}\t{PHOTO_CAPTIONS['coffee']}\n"


def test_resume_and_engine_usage_errors(tmp_path, image_folder, trained_checkpoint):
    result = run("caption", image_folder, "--resume")
    assert result.exit_code == 2 and "--resume needs --output" in result.output
    result = run("caption")
    assert result.exit_code == 2 and "--files-from" in result.output
    result = run("caption", image_folder, "--engine", "ray")
    assert result.exit_code == 2 and "--output folder" in result.output
    result = run("caption", image_folder, "-o", tmp_path / "x.parquet", "--format", "parquet")
    assert result.exit_code == 2 and "--engine ray" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = run("caption", image_folder, "-o", bad, "--resume", "--weights", trained_checkpoint)
    assert result.exit_code == 1 and "line 1 is not a caption record" in result.output


def test_file_names_that_are_not_utf8(tmp_path, photos, trained_checkpoint):
    folder = tmp_path / "odd"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.jpg"  # Latin-1, as old cameras and Windows shares write it
    photos["cat"].save(raw.decode("utf-8", "surrogateescape"), format="JPEG")
    common = ["--weights", trained_checkpoint, "--workers", 0]
    out = tmp_path / "out.jsonl"
    result = run("caption", folder, "-o", out, *common)
    assert result.exit_code == 0, result.output
    text = out.read_bytes().decode("utf-8")  # valid UTF-8: the odd byte is a JSON escape
    assert "\\udce9" in text
    assert os.fsencode(json.loads(text)["path"]) == raw  # reversible: os.fsencode gives the name back
    for fmt in ("csv", "txt"):  # the original bytes, as `ls` would print them
        out = tmp_path / f"out.{fmt}"
        assert run("caption", folder, "-o", out, *common).exit_code == 0
        assert raw in out.read_bytes()
    assert run("caption", folder, "--format", "txt", *common).exit_code == 0  # standard output too


def test_output_never_replaces_an_input(tmp_path, image_folder, trained_checkpoint):
    photo = image_folder / "cat.jpg"
    before = photo.read_bytes()
    for output in (photo, image_folder / "new.png"):
        result = run("caption", image_folder, "-o", output, "--weights", trained_checkpoint)
        assert result.exit_code == 2 and "--output" in result.output
    assert photo.read_bytes() == before and not (image_folder / "new.png").exists()
    listed = tmp_path / "listed.jsonl"
    listed.write_text("")
    result = run("caption", photo, listed, "-o", listed, "--weights", trained_checkpoint)
    assert result.exit_code == 2 and "is one of the input files" in result.output


def test_txt_and_csv_escaping(tmp_path, photos, trained_checkpoint):
    folder = tmp_path / "names"
    folder.mkdir()
    for name in ("tab\there.jpg", "new\nline.jpg", "=HYPERLINK(1).jpg"):
        photos["cat"].save(folder / name, format="JPEG")
    common = ["--weights", trained_checkpoint, "--workers", 0]
    txt = run("caption", folder, "--format", "txt", *common).stdout.splitlines()
    assert len(txt) == 3  # one line per record, whatever the names hold
    assert f"{folder}/tab\\there.jpg\t{PHOTO_CAPTIONS['cat']}" in txt
    assert f"{folder}/new\\nline.jpg\t" in txt[1] + txt[2]
    out = tmp_path / "out.txt"
    run("caption", folder, "-o", out, *common)
    assert "all 3 files are already captioned" in run("caption", folder, "-o", out, "--resume", *common).stderr
    out = tmp_path / "out.csv"
    run("caption", folder, "-o", out, *common)
    rows = list(csv.reader(out.open(newline="")))[1:]
    assert len(rows) == 3 and f"'{folder}/=HYPERLINK(1).jpg" not in [r[0] for r in rows]  # absolute paths start with /
    names = {Path(r[0]).name for r in rows}
    assert "=HYPERLINK(1).jpg" in names and "new\nline.jpg" in names  # csv quotes what it must
    flat = tmp_path / "relative"  # a relative path that starts with "=" is neutralised
    flat.mkdir()
    photos["cat"].save(flat / "=1+1.jpg", format="JPEG")
    cwd = os.getcwd()
    os.chdir(flat)
    try:
        result = run("caption", "=1+1.jpg", "--format", "csv", *common)
        again = run("caption", "=1+1.jpg", "-o", "x.csv", *common), run("caption", "=1+1.jpg", "-o", "x.csv",
                                                                         "--resume", *common)
    finally:
        os.chdir(cwd)
    assert list(csv.reader(io.StringIO(result.stdout)))[1][0] == "'=1+1.jpg"
    assert "all 1 files are already captioned" in again[1].stderr  # --resume reads the neutralised cell back


def test_exit_codes_for_output_errors_and_interruption(tmp_path, image_folder, trained_checkpoint, monkeypatch):
    import errno

    from captioner import records
    from captioner.inference import Captioner

    common = ["--weights", trained_checkpoint, "--workers", 0]

    def disk_full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(records.RecordWriter, "write", disk_full)
    result = run("caption", image_folder, "-o", tmp_path / "out.jsonl", *common)
    assert result.exit_code == 3 and "No space left on device" in result.stderr
    assert "Traceback" not in result.output
    monkeypatch.undo()

    def interrupted(self, *args, **kwargs):
        yield 0, None, "an error record before Ctrl-C"
        raise KeyboardInterrupt
    monkeypatch.setattr(Captioner, "caption_files", interrupted)
    out = tmp_path / "partial.jsonl"
    result = run("caption", image_folder, "-o", out, *common)
    assert result.exit_code == 130 and "--resume" in result.stderr
    assert len(_records(out.read_text())) == 1  # what was written is kept


def test_help_does_not_load_torch():
    code = ("import sys; from click.testing import CliRunner; from captioner.cli import main; "
            "r = CliRunner().invoke(main, ['caption', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_encoder_batches_are_bounded(trained_captioner, photos, monkeypatch):
    import torch

    from captioner import inference
    from captioner.images import preprocess

    seen = []
    real = trained_captioner.encoder

    def spy(pixels):
        seen.append(len(pixels))
        return real(pixels)
    monkeypatch.setattr(inference, "MAX_ENCODER_BATCH", 2)
    monkeypatch.setattr(trained_captioner, "encoder", spy)
    pixels = torch.stack([preprocess(img) for img in photos.values()] * 2)  # 8 images
    results = trained_captioner.caption_pixels(pixels)
    assert seen == [2, 2, 2, 2] and [r["caption"] for r in results[:4]] == list(PHOTO_CAPTIONS.values())


def test_the_last_batch_is_beam_searched_in_halves_with_the_same_captions(attention_captioner, photos,
                                                                         monkeypatch):
    import threading

    import torch

    from captioner.images import preprocess

    pixels = torch.stack([preprocess(img) for img in photos.values()] * 2)  # 8 images
    batches = [("a", pixels[:3]), ("none", None), ("b", pixels[3:])]
    alone = [r for _, p in batches if p is not None for r in attention_captioner.caption_pixels(p)]
    searched = []  # (thread, images) of every beam search
    real = attention_captioner._decode

    def spy(features, spatial, options):
        searched.append((threading.get_ident(), len(features)))
        return real(features, spatial, options)
    monkeypatch.setattr(attention_captioner, "_decode", spy)
    out = list(attention_captioner.caption_batches(batches, count=3))
    assert [k for k, _ in out] == ["a", "none", "b"] and out[1][1] is None
    assert out[0][1] + out[2][1] == alone  # the same results, in order
    assert [n for _, n in searched] == [3, 3, 2]  # the last batch of 5 in two parts ...
    assert searched[1][0] != searched[2][0]  # ... searched by two threads
    searched.clear()
    list(attention_captioner.caption_batches(batches))  # count unknown: whole batches
    assert [n for _, n in searched] == [3, 5]


def test_image_decoding_workers_run_at_a_lower_priority(image_folder):
    import torch

    from captioner.images import WORKER_NICENESS, ImageFiles, image_loader

    class Priority(ImageFiles):
        def __getitem__(self, i):
            return i, torch.tensor([os.getpriority(os.PRIO_PROCESS, 0)]), None

    loader = image_loader([image_folder / "cat.jpg"] * 2, batch_size=1, num_workers=1)
    loader.dataset.__class__ = Priority
    assert [int(p) for _, p, _ in loader] == [min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICENESS)] * 2


def test_confidence_in_every_format_and_min_confidence(tmp_path, image_folder, calibrated_checkpoint,
                                                       trained_checkpoint):
    files = [str(image_folder / "cat.jpg"), str(image_folder / "coffee.JPG")]
    base = ["caption", *files, "--weights", str(calibrated_checkpoint)]
    records = _records(CliRunner().invoke(main, base).stdout)
    assert all(0.0 <= r["confidence"] <= 1.0 and "low_confidence" not in r for r in records)
    assert [r["caption"] for r in records] == [PHOTO_CAPTIONS["cat"], PHOTO_CAPTIONS["coffee"]]
    rows = list(csv.DictReader(io.StringIO(CliRunner().invoke(main, base + ["--format", "csv"]).stdout)))
    assert [float(r["confidence"]) for r in rows] == [r["confidence"] for r in records]
    # Above everyone's confidence: every caption withheld, every record kept and marked.
    cut = max(r["confidence"] for r in records) + 1e-4
    result = CliRunner().invoke(main, base + ["--min-confidence", str(cut)])
    assert result.exit_code == 0
    withheld = _records(result.stdout)
    assert [(r["path"], r["caption"], r["low_confidence"]) for r in withheld] == [(f, None, True) for f in files]
    assert [r["confidence"] for r in withheld] == [r["confidence"] for r in records]
    txt = CliRunner().invoke(main, base + ["--min-confidence", str(cut), "--format", "txt"]).stdout.splitlines()
    assert txt == [f"{f}\t[low confidence]" for f in files]
    rows = list(csv.DictReader(io.StringIO(CliRunner().invoke(main, base + ["--min-confidence", str(cut),
                                                                            "--format", "csv"]).stdout)))
    assert [r["caption"] for r in rows] == ["", ""] and all(r["confidence"] for r in rows)
    # A model without a calibration gives no confidence: --min-confidence is refused.
    plain = CliRunner().invoke(main, ["caption", files[0], "--weights", str(trained_checkpoint)])
    assert _records(plain.stdout)[0]["confidence"] is None
    refused = CliRunner().invoke(main, ["caption", files[0], "--weights", str(trained_checkpoint),
                                        "--min-confidence", "0.5"])
    assert refused.exit_code == 2 and "calibrate" in refused.output


def test_sentence_case(image_folder, trained_checkpoint):
    assert sentence_case("a cat sits on the floor") == "A cat sits on the floor."
    assert sentence_case("is it a cat?") == "Is it a cat?" and sentence_case("") == ""
    files = [image_folder / "cat.jpg", image_folder / "empty.jpg"]
    common = ["--weights", trained_checkpoint, "--workers", 0]
    txt = run("caption", *files, "--format", "txt", "--sentence-case", *common).stdout.splitlines()
    assert txt[0] == f"{files[0]}\tA cat sits on the floor." and txt[1].startswith(f"{files[1]}\tERROR: ")
    records = _records(run("caption", files[0], "--n-best", 2, "--sentence-case", *common).stdout)
    assert all(c[0].isupper() and c.endswith(".") for c in [records[0]["caption"]] +
               [a["caption"] for a in records[0]["alternatives"]])
    # Without the flag captions stay as the model writes them.
    assert _records(run("caption", files[0], *common).stdout)[0]["caption"] == PHOTO_CAPTIONS["cat"]


def _xmp_description(path):
    with Image.open(path) as img:
        packet = img.info.get("xmp")
    return None if packet is None else descriptions(packet)


def test_write_xmp_sidecars_and_embedded(image_folder, trained_checkpoint):
    cat, rocket, empty = image_folder / "cat.jpg", image_folder / "rocket.png", image_folder / "empty.jpg"
    before = {p: p.read_bytes() for p in (cat, rocket)}
    common = ["--weights", trained_checkpoint, "--workers", 0, "--sentence-case"]
    result = run("caption", cat, rocket, empty, "--write-xmp", *common)
    assert result.exit_code == 1  # empty.jpg
    assert {p: p.read_bytes() for p in (cat, rocket)} == before  # sidecars never touch the photo
    assert descriptions(sidecar_path(cat).read_bytes()) == {"x-default": "A cat sits on the floor."}
    assert descriptions(sidecar_path(rocket).read_bytes()) == {"x-default": "A rocket on the launch pad."}
    assert not sidecar_path(empty).exists()
    # Embedded: JPEGs only; a PNG gets an error record that keeps its caption.
    records = _by_name(_records(run("caption", cat, rocket, "--write-xmp-embedded", *common).stdout))
    assert "error" not in records["cat.jpg"] and _xmp_description(cat) == {"x-default": "A cat sits on the floor."}
    assert records["rocket.png"]["caption"] and "not a JPEG" in records["rocket.png"]["error"]
    assert rocket.read_bytes() == before[rocket]
    with Image.open(cat) as new, Image.open(io.BytesIO(before[cat])) as old:
        assert np.array_equal(np.asarray(new), np.asarray(old))


def test_withheld_captions_write_no_xmp(tmp_path, image_folder, calibrated_checkpoint):
    cat = image_folder / "cat.jpg"
    base = ["caption", cat, "--weights", calibrated_checkpoint, "--workers", 0]
    cut = _records(run(*base).stdout)[0]["confidence"] + 1e-4
    before = cat.read_bytes()
    result = run(*base, "--min-confidence", cut, "--write-xmp", "--write-xmp-embedded")
    assert result.exit_code == 0 and _records(result.stdout)[0]["caption"] is None
    assert not sidecar_path(cat).exists() and cat.read_bytes() == before


def test_http_inputs_on_the_command_line(image_folder, trained_checkpoint, photos):
    with photo_server(image_bytes(photos["cat"])) as base:
        urls = [f"{base}/cat.jpg", f"{base}/missing.jpg"]
        result = run("caption", *urls, "--weights", trained_checkpoint, "--workers", 0)
        refused = run("caption", urls[0], "--write-xmp", "--weights", trained_checkpoint)
    assert result.exit_code == 1
    records = _records(result.stdout)
    assert [r["path"] for r in records] == urls  # the URL as given, not folded into a path
    assert records[0]["caption"] == PHOTO_CAPTIONS["cat"] and "HTTP 404" in records[1]["error"]
    assert refused.exit_code == 2 and "is a URL" in refused.output


def test_archive_flags_need_the_local_engine(tmp_path, image_folder):
    for flag in ("--sentence-case", "--write-xmp", "--write-xmp-embedded"):
        result = run("caption", image_folder, flag, "--engine", "ray", "--output", tmp_path / "out")
        assert result.exit_code == 2 and "only with the local engine" in result.output


def test_attention_dir_writes_a_figure_per_photo(tmp_path, photo_files, attention_checkpoint, trained_checkpoint):
    (photo_files / "more").mkdir()
    Image.open(photo_files / "cat.jpg").save(photo_files / "more" / "cat.jpg")  # the same name in a sub-folder
    maps, out = tmp_path / "maps", tmp_path / "out.jsonl"
    result = run("caption", photo_files, "-r", "--weights", attention_checkpoint, "--attention-dir", maps,
                 "--output", out, "--workers", 0, "--backend", "torch")
    assert result.exit_code == 0, result.output
    records = _records(out.read_text())
    assert len(records) == 5
    for r in records:
        png = Path(r["attention_png"])
        assert png.is_relative_to(maps) and png.name == Path(r["path"]).name + ".attention.png"
        assert [a["word"] for a in r["attention"]] == r["caption"].split()  # jsonl keeps the maps too
        with Image.open(png) as figure:  # a tile (and a label) per word, five to a row
            assert figure.format == "PNG" and figure.height >= 160 * -(-len(r["attention"]) // 5)
    assert len({r["attention_png"] for r in records}) == 5  # more/cat.jpg did not overwrite cat.jpg's
    result = CliRunner().invoke(main, ["caption", str(photo_files), "--weights", str(trained_checkpoint),
                                       "--attention-dir", str(maps), "--workers", "0"])
    assert result.exit_code == 2 and "no attention maps" in result.output


def test_attention_figure_heats_the_attended_cells():
    from captioner.heatmaps import attention_figure, heat_tile

    photo = Image.new("RGB", (140, 70), (128, 128, 128))
    weights = [[0.0] * 7 for _ in range(7)]
    weights[0][6] = 1.0  # all on the top-right cell
    tile = np.asarray(heat_tile(photo, weights, height=70)).astype(int)
    top_right, bottom_left = tile[5, -5], tile[-5, 5]
    assert top_right[0] > 150 and top_right[0] - top_right[2] > 100  # red where the word looked
    assert abs(bottom_left[0] - bottom_left[2]) < 5  # grey (dimmed) elsewhere
    figure = attention_figure(photo, [{"word": w, "weights": weights} for w in "a b c d e f".split()], "a b c")
    assert figure.width == 5 * 320 and figure.height == 20 + 2 * (160 + 20)
