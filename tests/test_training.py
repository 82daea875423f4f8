"""End-to-end `captioner train` / `evaluate` on a generated dataset, and the metric wrapper."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from captioner.cli import main
from captioner.metrics import java_available, score_captions

CAPTIONS = {
    "cat": ["a cat sits on a chair", "an orange cat looks ahead"],
    "coffee": ["a cup of coffee on a table", "a red cup with coffee"],
    "rocket": ["a rocket on the launch pad", "a space shuttle ready to launch"],
    "astronaut": ["a woman in a space suit", "an astronaut smiles at the camera"],
}


@pytest.fixture
def dataset(tmp_path, photos):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = ["image,caption,split"]
    for name, img in photos.items():
        img.save(folder / f"{name}.jpg")
        split = "val" if name == "astronaut" else "train"
        rows += [f"{name}.jpg,{c},{split}" for c in CAPTIONS[name]]
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append("broken.jpg,a picture that cannot be read,train")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def train(dataset, out, cache, *extra):
    args = ["train", "--data", dataset, "--out", out, "--cache-dir", cache, "--embed-dim", 16, "--hidden-dim", 16,
            "--min-word-count", 1, "--batch-size", 4, "--workers", 0, "--lr", 5e-3, *extra]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_is_exact_and_evaluate_runs(tmp_path, dataset, caplog, monkeypatch):
    cache = tmp_path / "cache"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(dataset, straight, cache, "--epochs", 3)
    assert "skipped 1 unreadable images" in caplog.text
    for name in ("best.safetensors", "last.safetensors", "train_state.pt", "metrics.jsonl", "curves.png"):
        assert (straight / name).is_file(), name
    row = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss", "val_CIDEr", "val_BLEU-4", "lr", "epoch_time_s"} <= row.keys()

    # Kill a 3-epoch run right after epoch 2 was saved, then resume it.
    import captioner.train
    real_plot = captioner.train.plot_curves

    def crash_after_epoch_2(metrics_file, *args):
        real_plot(metrics_file, *args)
        if len(metrics_file.read_text().splitlines()) == 2:
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(captioner.train, "plot_curves", crash_after_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(dataset, resumed, cache, "--epochs", 3)
    monkeypatch.undo()
    assert _epochs(resumed) == [1, 2]
    train(dataset, resumed, cache, "--epochs", 3, "--resume")
    assert _epochs(resumed) == [1, 2, 3]
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(resumed / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    out = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(straight / "best.safetensors"), "--data",
                                       str(dataset), "--split", "val", "--output", str(out), "--workers", "0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["images"] == 1 and report["captions"][0]["caption"]
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= report["scores"].keys()
    assert "CIDEr" in result.output and "BLEU-4" in result.output

    # The CLI loads the trained model.
    result = CliRunner().invoke(main, ["caption", str(dataset.parent / "cat.jpg"), "--weights",
                                       str(straight / "best.safetensors")], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.stdout)["caption"]


@pytest.mark.parametrize("extra", [["--cell", "gru", "--num-layers", "2"], ["--cell", "rnn"]])
def test_other_cells_train(tmp_path, dataset, extra):
    train(dataset, tmp_path / "run", tmp_path / "cache", "--epochs", 1, *extra)
    info = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert info["train_loss"] > 0


def test_resume_without_state_and_bad_data_are_clear_errors(tmp_path, dataset):
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "new"), "--resume"])
    assert result.exit_code == 1 and "no" in result.output and "train_state.pt" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("img,text\n")
    result = CliRunner().invoke(main, ["train", "--data", str(bad), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "missing column" in result.output


def test_bleu_on_hand_made_captions():
    refs = {1: ["a man rides a red bike down the street"]}
    same = score_captions({1: "a man rides a red bike down the street"}, refs, use_java=False)
    assert same["BLEU-1"] == pytest.approx(1.0) and same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    # 9 candidate words against 9 reference words (brevity penalty 1); matched: a, a, rides,
    # down, the -> BLEU-1 = 5/9.
    part = score_captions({1: "a woman rides a blue horse down the road"}, refs, use_java=False)
    assert part["BLEU-1"] == pytest.approx(5 / 9, abs=1e-4)
    assert part["tokenizer"] == "simple" and "METEOR" not in part
    with pytest.raises(ValueError):
        score_captions({1: "x"}, {2: ["y"]})


@pytest.mark.skipif(not java_available() and not __import__("os").environ.get("CI"),
                    reason="Java is not installed (make java); CI always runs this")
def test_standard_scorer_with_java():
    refs = {1: ["A man rides a red bike down the street.", "Someone cycling."],
            2: ["Two dogs play in the snow.", "Dogs in snow."]}
    preds = {1: "a man rides a red bike down the street", 2: "two dogs play in the snow"}
    scores = score_captions(preds, refs, use_java=True)
    assert scores["tokenizer"] == "ptb"
    assert scores["BLEU-1"] == pytest.approx(1.0)
    assert 0 < scores["METEOR"] <= 1 and 0 < scores["ROUGE-L"] <= 1 and scores["CIDEr"] > 0


def test_fine_tune_encoder_trains_and_stores_the_encoder(tmp_path, dataset):
    run = tmp_path / "ft"
    train(dataset, run, tmp_path / "cache", "--epochs", 1, "--fine-tune-encoder", "--encoder-lr", 1e-3)
    from captioner.checkpoint import load_model
    from captioner.encoder import load_encoder

    model, _, _ = load_model(run / "last.safetensors")
    assert model.encoder_tuned
    pretrained = load_encoder()
    assert not torch.equal(model.encoder._conv_stem.weight, pretrained._conv_stem.weight)  # it learned
    train(dataset, run, tmp_path / "cache", "--epochs", 2, "--fine-tune-encoder", "--encoder-lr", 1e-3, "--resume")
    assert _epochs(run) == [1, 2]
