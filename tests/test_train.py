"""End-to-end `captioner train` and `captioner evaluate` on a generated dataset."""
import json
import logging

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from captioner import Captioner, metrics
from captioner.checkpoint import read_checkpoint
from captioner.cli import main
from captioner.train import lr_factor

CAPTIONS = {
    "cat": ["a cat sits on a chair", "an orange cat looks ahead"],
    "coffee": ["a cup of coffee on a table", "a red cup with coffee"],
    "rocket": ["a rocket on the launch pad", "a space shuttle ready to launch"],
    "astronaut": ["a woman in a space suit", "an astronaut smiles at the camera"],
}
TIMING = {"train_time_s", "captions_per_s", "epoch_time_s"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos):
    """data.csv with several rows per image, a split column (astronaut is val) and one
    unreadable image. Shared by the module so image features are computed once: do not modify."""
    folder = tmp_path_factory.mktemp("train-data")
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
    args = ["train", "--data", dataset, "--out", out, "--cache-dir", cache, "--embed-dim", 32, "--hidden-dim", 32,
            "--min-word-count", 1, "--batch-size", 4, "--workers", 0, "--lr", 5e-3, "--from-scratch", *extra]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_train_then_resume_equals_a_straight_run(tmp_path, dataset, feature_cache, caplog):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level(logging.WARNING):
        result = train(dataset, resumed, feature_cache, "--epochs", 2, "--lr-decay-epochs", 30)
    # The unreadable image was skipped and counted, not a crash.
    assert "skipped 1 unreadable images" in caplog.text and "broken.jpg" in caplog.text
    assert "best val CIDEr" in result.output
    for name in ("best.safetensors", "last.safetensors", "train_state.pt", "metrics.jsonl", "curves.png"):
        assert (resumed / name).is_file(), name
    assert Image.open(resumed / "curves.png").format == "PNG"
    rows = _rows(resumed)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "lr", "val_CIDEr", "val_BLEU-1", "val_BLEU-4", "epoch_time_s", "skipped_images"} \
        <= rows[0].keys()
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[0]["val_loss"] > 0 and 0 < rows[0]["val_distinct_captions"] <= 1
    assert list(rows[0]["samples"]) == ["astronaut.jpg"] and isinstance(rows[0]["samples"]["astronaut.jpg"], str)
    assert [r["lr"] for r in rows] == pytest.approx([5e-3, 5e-3 * lr_factor(1, 30)])
    config, vocab, _, tensors, info = read_checkpoint(resumed / "last.safetensors")
    assert (config.embed_dim, config.hidden_dim, config.cell) == (32, 32, "lstm")
    assert info["epoch"] == 2 and info["train_images"] == 4  # broken.jpg is listed but yields no features
    assert "cat" in vocab.stoi and "cannot" in vocab.stoi  # vocabulary from the train captions, min count 1
    assert all(k.startswith("decoder.") for k in tensors)

    # A run stopped after logging epoch 3 but before saving its state logs epoch 3 once.
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**rows[-1], "epoch": 3}) + "\n")
    train(dataset, resumed, feature_cache, "--epochs", 3, "--resume")  # keeps --lr-decay-epochs 30
    assert [r["epoch"] for r in _rows(resumed)] == [1, 2, 3]  # appended, numbering continued
    assert read_checkpoint(resumed / "last.safetensors")[4]["epoch"] == 3

    train(dataset, straight, feature_cache, "--epochs", 3, "--lr-decay-epochs", 30)
    assert _without_timing(_rows(straight)) == _without_timing(_rows(resumed))
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(resumed / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # A trained checkpoint captions photos through the public API.
    result = Captioner.from_pretrained(straight / "best.safetensors", device="cpu").caption(dataset.parent / "cat.jpg")
    assert result["caption"] and set(result["caption"].split()) <= set(vocab.itos)


def test_evaluate_writes_scores_and_captions(tmp_path, dataset, feature_cache, monkeypatch):
    # The Java scorers (PTB tokenizer, METEOR) take seconds per call; test_metrics covers them.
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 1)
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(run / "best.safetensors"), "--data",
                                       str(dataset), "--split", "val", "--output", str(out), "--workers", "0",
                                       "--beam-size", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["split"] == "val" and report["decode"]["beam_size"] == 2 and report["images"] == 1
    assert report["decode"]["grounding"] is True
    assert report["backend"] in ("torch", "torch-bf16", "onnx") and f"backend {report['backend']}" in result.output
    assert report["failed"] == {}
    assert {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "tokenizer"} <= report["scores"].keys()
    assert all(0 <= v for k, v in report["scores"].items() if k != "tokenizer")
    [caption] = report["captions"]
    assert caption["image"].endswith("astronaut.jpg") and caption["caption"] and "objects" in caption
    assert caption["references"] == CAPTIONS["astronaut"]
    assert "CIDEr" in result.output and f"written to {out}" in result.output
    assert report["scores"]["tokenizer"] == "simple" and "Java not found" in result.stderr
    # The train split holds the unreadable image: reported as failed, not scored, no crash.
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(run / "best.safetensors"), "--data",
                                       str(dataset), "--split", "train", "--workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((run / "scores-train.json").read_text())  # default: beside the checkpoint
    assert report["images"] == 3 and list(report["failed"]) == [str(dataset.parent / "broken.jpg")]
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(run / "best.safetensors"), "--data",
                                       str(dataset), "--split", "test", "--workers", "0"])
    assert result.exit_code == 1 and "no images in split 'test'" in result.output


@pytest.mark.parametrize("extra", [["--cell", "gru"], ["--cell", "rnn"], ["--num-layers", "2"],
                                   ["--cell", "gru", "--num-layers", "2", "--beam-size", "1"]])
def test_other_cells_and_layers_train(tmp_path, dataset, feature_cache, extra):
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 1, *extra)
    [row] = _rows(run)
    assert row["epoch"] == 1 and row["train_loss"] > 0
    config = read_checkpoint(run / "best.safetensors")[0]
    assert config.cell == (extra[1] if extra[0] == "--cell" else "lstm")
    assert config.num_layers == (2 if "--num-layers" in extra else 1)
    captioner = Captioner.from_pretrained(run / "best.safetensors", device="cpu")
    assert captioner.model.decoder.rnn.num_layers == config.num_layers
    assert captioner.caption(dataset.parent / "rocket.jpg", beam_size=2)["caption"]


def test_a_new_model_trains_with_the_lite2_encoder(tmp_path, dataset, feature_cache):
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 1, "--encoder", "efficientnet-lite2", "--backend", "torch")
    assert read_checkpoint(run / "best.safetensors")[0].encoder == "efficientnet-lite2"
    captioner = Captioner.from_pretrained(run / "best.safetensors", device="cpu", backend="torch")
    assert len(captioner.model.encoder._blocks) == 21  # Lite2's, with its packaged weights
    assert captioner.caption(dataset.parent / "cat.jpg", beam_size=2)["caption"]


def test_clear_errors(tmp_path, dataset, feature_cache):
    def invoke(*args):
        return CliRunner().invoke(main, ["train", *map(str, args), "--cache-dir", str(feature_cache), "--from-scratch"])

    result = invoke("--data", dataset, "--out", tmp_path / "new", "--resume")
    assert result.exit_code == 1 and "no" in result.output and "train_state.pt" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("img,text\n")
    result = invoke("--data", bad, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "bad.csv:1: missing column" in result.output
    one = tmp_path / "one.csv"
    one.write_text(f"image,caption,split\n{dataset.parent / 'cat.jpg'},a cat,train\n")
    result = invoke("--data", one, "--out", tmp_path / "y")
    assert result.exit_code == 1 and "no validation images" in result.output
    result = invoke("--data", dataset, "--out", tmp_path / "z", "--cell", "transformer")
    assert result.exit_code == 2


def test_learning_rate_schedule():
    assert lr_factor(0, 30) == 1.0
    assert lr_factor(15, 30) == pytest.approx(0.05 + 0.95 / 2)
    assert lr_factor(30, 30) == pytest.approx(0.05) and lr_factor(45, 30) == pytest.approx(0.05)  # flat after
    factors = [lr_factor(e, 10) for e in range(12)]
    assert factors == sorted(factors, reverse=True)
    assert lr_factor(0, 1) == 1.0 and lr_factor(1, 1) == pytest.approx(0.05)


def test_fine_tune_encoder_trains_and_stores_the_encoder(tmp_path, dataset, feature_cache):
    from captioner.checkpoint import load_model
    from captioner.encoder import load_encoder

    run = tmp_path / "ft"
    train(dataset, run, feature_cache, "--epochs", 1, "--fine-tune-encoder", "--encoder-lr", 1e-3)
    model, _, _ = load_model(run / "last.safetensors")
    assert model.encoder_tuned
    assert not torch.equal(model.encoder._conv_stem.weight, load_encoder()._conv_stem.weight)  # it learned
    train(dataset, run, feature_cache, "--epochs", 2, "--fine-tune-encoder", "--encoder-lr", 1e-3, "--resume")
    assert [r["epoch"] for r in _rows(run)] == [1, 2]


def test_a_finished_run_is_never_overwritten(tmp_path, dataset, feature_cache):
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 1)
    before = (run / "best.safetensors").read_bytes()
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(run), "--cache-dir",
                                       str(feature_cache), "--epochs", "1"])
    assert result.exit_code == 1 and "already holds a training run" in result.output
    assert (run / "best.safetensors").read_bytes() == before


def test_text_only_captions_teach_new_words(tmp_path, dataset, feature_cache):
    """Captions without images widen the vocabulary and train the decoder's concept input:
    a concept vector for "zebra" makes a model that never saw a zebra photo say zebra."""
    from captioner.inference import decode_features
    from captioner.model import beam_search

    text = tmp_path / "text.txt"
    text.write_text("\n".join(["a zebra stands in a field of grass", "two zebras graze in the field",
                               "a plate of broccoli on a table", "broccoli and rice on a plate"] * 25) + "\n")
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 6, "--text-data", text, "--lr", 1e-2, "--dropout", 0)
    # The last epoch's model: one validation photo's CIDEr may stay 0 and keep epoch 1 the "best".
    captioner = Captioner.from_pretrained(run / "last.safetensors", device="cpu")
    model, vocab = captioner.model, captioner.vocab
    assert {"zebra", "zebras", "broccoli", "cat"} <= set(vocab.stoi)
    assert model.config.num_concepts == len(model.concepts) > 0
    info = read_checkpoint(run / "last.safetensors")[4]
    assert info["text_captions"] == 100 and info["train_config"]["text_data"] == [str(text)]
    # The decoder's concept input alone (no photo) steers it to the concept's sentences.
    zebra = torch.zeros(1, len(model.concepts))
    zebra[0, model.concepts.index_of_word["zebra"]] = 0.9
    no_photo = torch.zeros(1, model.config.feature_dim), torch.zeros(1, 49, model.config.feature_dim)  # as text rows
    (hyps,) = beam_search(model.decoder, no_photo[0], concepts=zebra, spatial=no_photo[1])
    assert "zebra" in vocab.decode(hyps[0][0]) or "zebras" in vocab.decode(hyps[0][0])
    assert [r["captions"] for r in _rows(run)] == [6 + 100] * 6  # 3 train photos x 2 captions + the text
    # Grounded decoding of a real photo still works end to end.
    result = captioner.caption(dataset.parent / "cat.jpg")
    assert "cat" in result["caption"].split() and result["objects"][0]["word"] == "cat"
    assert decode_features(model, vocab, no_photo[0].repeat(2, 1), spatial=no_photo[1].repeat(2, 1, 1))[0]["caption"]


def test_text_sample_draws_a_share_of_the_text_each_epoch(tmp_path, dataset, feature_cache):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"a zebra number {i} stands in a field" for i in range(40)) + "\n")
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 2, "--text-data", text, "--text-sample", 0.25)
    assert [r["captions"] for r in _rows(run)] == [6 + 10] * 2


def test_no_concepts_and_text_data_errors(tmp_path, dataset, feature_cache):
    run = tmp_path / "plain"
    train(dataset, run, feature_cache, "--epochs", 1, "--no-concepts")
    assert read_checkpoint(run / "best.safetensors")[0].num_concepts == 0
    captioner = Captioner.from_pretrained(run / "best.safetensors", device="cpu")
    assert captioner.caption(dataset.parent / "cat.jpg")["objects"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "e"), "--cache-dir",
                                       str(feature_cache), "--text-data", str(empty)])
    assert result.exit_code == 1 and "empty.txt: no captions" in result.output
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "f"), "--cache-dir",
                                       str(feature_cache), "--text-data", str(dataset), "--fine-tune-encoder"])
    assert result.exit_code == 1 and "cannot be combined" in result.output


def test_warm_start_keeps_trained_words_and_adds_new_ones(tmp_path, dataset, feature_cache, photos):
    first = tmp_path / "first"
    train(dataset, first, feature_cache, "--epochs", 1)
    old_config, old_vocab, _, old_tensors, _ = read_checkpoint(first / "best.safetensors")
    # New data: the same photos, captions with words the first model never saw.
    folder = tmp_path / "more"
    folder.mkdir()
    rows = ["image,caption,split"]
    for name, img in photos.items():
        img.save(folder / f"{name}.jpg")
        rows.append(f"{name}.jpg,a zebra grazes near a {name},{'val' if name == 'astronaut' else 'train'}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    second = tmp_path / "second"
    result = CliRunner().invoke(main, [str(a) for a in [
        "train", "--data", folder / "data.csv", "--out", second, "--cache-dir", feature_cache, "--init-from",
        first / "best.safetensors", "--min-word-count", 1, "--epochs", 1, "--lr", 1e-12, "--workers", 0]])
    assert result.exit_code == 0, result.output
    config, vocab, _, tensors, info = read_checkpoint(second / "best.safetensors")
    assert (config.embed_dim, config.hidden_dim) == (old_config.embed_dim, old_config.hidden_dim)  # not the flags'
    assert vocab.itos[:len(old_vocab)] == old_vocab.itos  # trained words keep their ids
    assert {"zebra", "grazes", "near"} <= set(vocab.itos[len(old_vocab):])  # new words appended
    assert config.vocab_size == len(vocab) > len(old_vocab)
    n = len(old_vocab)
    for key in ("decoder.embed.weight", "decoder.out.weight", "decoder.out.bias"):  # old rows carried over
        assert torch.allclose(tensors[key][:n], old_tensors[key], atol=1e-6), key
    assert torch.allclose(tensors["decoder.init_h.weight"], old_tensors["decoder.init_h.weight"], atol=1e-6)
    assert info["train_config"]["init_from"] == str(first / "best.safetensors")


def test_warm_start_errors(tmp_path, dataset, feature_cache, tiny_model, tiny_vocab):
    from captioner.checkpoint import save_checkpoint

    tuned = tmp_path / "tuned.safetensors"
    tiny_model.encoder_tuned = True
    try:
        save_checkpoint(tuned, tiny_model, tiny_vocab)
    finally:
        tiny_model.encoder_tuned = False
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(plain, tiny_model, tiny_vocab)
    for source, extra, message in ((tuned, [], "needs --fine-tune-encoder"),
                                   (tmp_path / "missing.safetensors", [], "not found"),
                                   (plain, ["--encoder", "efficientnet-lite2"], "a warm start keeps its encoder")):
        result = CliRunner().invoke(main, [str(a) for a in [
            "train", "--data", dataset, "--out", tmp_path / source.stem, "--cache-dir", feature_cache,
            "--init-from", source, "--epochs", 1, "--workers", 0, *extra]])
        assert result.exit_code == 1 and message in result.output, result.output


def test_amp_type_follows_the_gpu(monkeypatch):
    from captioner.train import amp_dtype

    assert amp_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: emulated bf16
    assert amp_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert amp_dtype(torch.device("cuda:1")) == torch.bfloat16
    assert amp_dtype(torch.device("cuda"), amp=False) is None


def test_device_option_takes_cuda_n(tmp_path, dataset):
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "r"),
                                       "--device", "tpu"])
    assert result.exit_code == 2 and "cuda:N" in result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "r"),
                                           "--device", "cuda:1"])
        assert result.exit_code == 1 and "no CUDA GPU" in result.output


def test_bad_data_is_refused_up_front(tmp_path, photos, feature_cache, caplog):
    folder = tmp_path / "three"
    folder.mkdir()
    rows = ["image,caption,split"]
    for name in ("cat", "coffee", "rocket"):
        photos[name].save(folder / f"{name}.jpg")
        rows.append(f"{name}.jpg,a {name} here,{'val' if name == 'rocket' else 'train'}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(main, ["train", "--data", str(folder / "data.csv"), "--out", str(tmp_path / "r"),
                                           "--cache-dir", str(feature_cache), "--from-scratch"])
    assert result.exit_code == 1 and "lower --min-word-count" in result.output  # not an IndexError an epoch later
    assert "only 1 validation image" in caplog.text
    for name, content, message in (
            ("latin1.csv", "image,caption\ncat.jpg,a caf\xe9 cat\n".encode("latin-1"), "latin1.csv:2: not UTF-8"),
            ("huge.csv", ("image,caption\ncat.jpg,ok\ncat.jpg," + "x" * 140_000 + "\n").encode(), "huge.csv:3: field"),
            ("typed.jsonl", b'{"image": 5, "caption": "a cat"}\n', 'typed.jsonl:1: "image" must be text')):
        (folder / name).write_bytes(content)
        result = CliRunner().invoke(main, ["train", "--data", str(folder / name), "--out", str(tmp_path / name)])
        assert result.exit_code == 1 and message in result.output, result.output


def test_run_files_are_readable_by_others(tmp_path, dataset, feature_cache):
    import stat

    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 1)
    for name in ("best.safetensors", "last.safetensors", "train_state.pt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    assert not list(run.glob("*.tmp"))


def test_resume_keeps_the_runs_settings_and_refuses_changes(tmp_path, dataset, feature_cache, monkeypatch):
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 1, "--cell", "gru")  # also embed/hidden 32, batch 4, lr 5e-3
    for flags, message in ((["--cell", "lstm"], "--cell was 'gru', now 'lstm'"),
                           (["--lr", 1e-3], "--lr was 0.005, now 0.001"),
                           (["--beam-size", 1], "--beam-size was 3, now 1")):
        result = CliRunner().invoke(main, [str(a) for a in ["train", "--data", dataset, "--out", run, "--cache-dir",
                                                             feature_cache, "--resume", "--epochs", 2, *flags]])
        assert result.exit_code == 1 and message in result.output, result.output
    # The same data file by another path is the same setting.
    monkeypatch.chdir(dataset.parent)
    result = CliRunner().invoke(main, [str(a) for a in ["train", "--data", dataset.name, "--out", run, "--resume",
                                                         "--cache-dir", feature_cache, "--epochs", 1, "--workers", 0]])
    assert result.exit_code == 0 and "was" not in result.output, result.output
    # Only what may change is given: the rest comes from the run, and what changed is recorded.
    result = CliRunner().invoke(main, [str(a) for a in ["train", "--data", dataset, "--out", run, "--resume",
                                                         "--cache-dir", feature_cache, "--epochs", 2,
                                                         "--patience", 3, "--workers", 0]])
    assert result.exit_code == 0, result.output
    config, _, _, _, info = read_checkpoint(run / "last.safetensors")
    assert config.cell == "gru" and config.hidden_dim == 32 and info["epoch"] == 2
    assert info["train_config"]["epochs"] == 2 and info["train_config"]["patience"] == 3
    assert info["train_config"]["cell"] == "gru" and info["train_config"]["lr"] == 5e-3  # true, not the flags' defaults
    assert [r["epoch"] for r in _rows(run)] == [1, 2]


def test_evaluate_a_run_on_its_own_split(tmp_path, dataset, feature_cache, monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    run = tmp_path / "run"
    train(dataset, run, feature_cache, "--epochs", 1, "--val-fraction", 0.3)
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--split", "val", "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "scores-val.json").read_text())
    assert report["checkpoint"] == str(run / "best.safetensors") and report["data"] == str(dataset)
    assert [c["image"] for c in report["captions"]] == [str(dataset.parent / "astronaut.jpg")]  # the run's val
    (run / "scores-val.json").unlink()
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--workers", "0"])  # no test split: val
    assert result.exit_code == 0 and "scoring the val split" in result.output, result.output
    assert json.loads((run / "scores-val.json").read_text())["split"] == "val"
    result = CliRunner().invoke(main, ["evaluate", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "no training run there" in result.output
    result = CliRunner().invoke(main, ["evaluate"])
    assert result.exit_code == 2 and "give --data" in result.output


def test_text_photos_pair_text_captions_with_photos_of_what_they_name(tmp_path, dataset, feature_cache, photos):
    """--text-photos: a text-only caption that names the concept a photo shows is trained
    with that photo's feature; one that names people, or nothing a photo shows, keeps none."""
    from captioner.options import TrainConfig
    from captioner.train import Processes, build_model
    from captioner.train_data import load_data, read_training_records

    folder = tmp_path / "objects"
    folder.mkdir()
    photos["cat"].save(folder / "cat.jpg")
    photos["coffee"].save(folder / "espresso.jpg")
    text = tmp_path / "text.txt"
    text.write_text("a cat sleeps on a sofa\na man holds a cat\na cup of coffee on a table\na zebra in a field\n")
    config = TrainConfig(data=dataset, out=tmp_path / "run", cache_dir=feature_cache, embed_dim=32, hidden_dim=32,
                         min_word_count=1, batch_size=64, workers=0, text_data=[text], text_photos=folder,
                         backend="torch")
    train_set, val_set, text_captions = read_training_records(config)
    cpu = torch.device("cpu")
    model, vocab = build_model(config, train_set, text_captions, None, cpu)
    batches, _ = load_data(config, model, vocab, train_set, val_set, text_captions, cpu, Processes())
    assert [len(c) for c in batches.text_photos.candidates] == [1, 0, 1, 0] and batches.text_photos.paired == 2
    batches.set_epoch(0)
    ((features, maps, concepts, tokens, _),) = list(batches)
    assert len(tokens) == 6 + 4  # 3 photos x 2 captions and the text
    assert int((features.abs().sum(1) > 0).sum()) == 6 + 2  # the photos' rows and the two paired text rows
    # An attention model (the default) gets the same rows' maps, whose mean is the pooled feature.
    assert maps.shape == (10, 49, 1280) and torch.equal(maps.abs().sum((1, 2)) > 0, features.abs().sum(1) > 0)
    assert torch.allclose(maps.mean(1), features, atol=2e-3)  # the maps are stored as float16
    plain, _ = load_data(config.replace(text_photos=None), model, vocab, train_set, val_set, text_captions, cpu,
                         Processes())
    plain.set_epoch(0)
    assert int((next(iter(plain))[0].abs().sum(1) > 0).sum()) == 6


def test_every_tensor_the_model_sees_is_on_its_device(tmp_path, dataset, feature_cache, monkeypatch):
    """The meta device stands in for a GPU: an op that mixes a CPU tensor into a meta
    model's weights raises, as on CUDA ("Expected all tensors to be on the same device"),
    so features left on the CPU (the validation ones once were) fail here."""
    from captioner.options import TrainConfig
    from captioner.train import Processes, TrainStep, batch_to_device, build_model, caption_loss, validation_loss
    from captioner.train_data import load_data, read_training_records

    text = tmp_path / "text.txt"
    text.write_text("a zebra stands in a field\na plate of broccoli\n")
    config = TrainConfig(data=dataset, out=tmp_path / "run", cache_dir=feature_cache, embed_dim=32, hidden_dim=32,
                         min_word_count=1, batch_size=4, workers=0, text_data=[text], feature_dropout=0.5,
                         backend="torch")  # what "auto" means on a GPU, and here
    train_set, val_set, text_captions = read_training_records(config)
    cpu = torch.device("cpu")
    model, vocab = build_model(config, train_set, text_captions, None, cpu)
    load_data(config, model, vocab, train_set, val_set, text_captions, cpu, Processes())  # fills the store
    import captioner.features

    weights = captioner.features.weights_hash(model.encoder)  # meta weights have no bytes to hash
    monkeypatch.setattr(captioner.features, "weights_hash", lambda encoder: weights)
    meta = torch.device("meta")
    model = model.to(meta)
    batches, validation = load_data(config, model, vocab, train_set, val_set, text_captions, meta, Processes())
    step, seen = TrainStep(model), 0
    batches.set_epoch(0)
    for inputs, spatial, concepts, tokens, _ in batches:
        assert inputs.device == concepts.device == spatial.device == meta
        inputs, spatial, concepts, tokens = batch_to_device(inputs, spatial, concepts, tokens, meta)
        loss = caption_loss(step(inputs, spatial, tokens[:, :-1], concepts).float(), tokens[:, 1:])
        loss.backward()
        seen += len(tokens)
    assert seen == batches.captions == 6 + 2  # 3 photos x 2 captions and the text
    assert all(p.grad.device == meta for p in model.decoder.parameters())
    features, maps, records = validation.encoded(model, meta)
    assert features.device == maps.device == meta and [r.image.name for r in records] == ["astronaut.jpg"]
    total, count = validation_loss(model, vocab, features, maps, records, config.max_caption_length, 0.1)
    assert total.device == meta and count == 2


def test_train_config_is_the_one_place_for_settings(tmp_path, dataset, monkeypatch):
    """The CLI's flags, defaults and limits come from TrainConfig; the library checks the same."""
    import dataclasses

    import captioner.train
    from captioner.options import TrainConfig

    seen = {}
    monkeypatch.setattr(captioner.train, "train", lambda config, resume: seen.update(config=config) or
                        {"best": 0.0, "metric": "CIDEr"})
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert seen["config"] == TrainConfig(data=str(dataset), out=str(tmp_path / "r"))  # every default the same
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for f in dataclasses.fields(TrainConfig):
        if f.name != "decode":
            assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")).split("/")[0] in help_text, f.name
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--text-sample",
                                       "0", "--cell", "gru", "--beam-size", "2", "--no-concepts"])
    assert result.exit_code == 2 and "--text-sample" in result.output  # (0, 1]: the limit from TrainConfig
    with pytest.raises(ValueError, match=r"--text-sample must be in \(0, 1\]"):
        TrainConfig(data="d", out="o", text_sample=0)
    with pytest.raises(ValueError, match="--cell must be one of lstm, gru, rnn"):
        TrainConfig(data="d", out="o", cell="transformer")
    config = TrainConfig(data="d", out="o", max_caption_length=30)
    assert config.decode.max_length == 30 and TrainConfig.from_dict(config.to_dict()) == config


def test_runs_started_before_train_config_still_resume():
    """train_state.pt of earlier versions stored the train() keywords of then as "settings"."""
    from captioner.options import DecodeOptions, TrainConfig
    from captioner.run_state import upgrade

    old = {"data": "d.csv", "out": "runs/x", "format": "csv", "images": None, "epochs": 3, "batch_size": 4,
           "num_workers": 0, "beam_size": 2, "decode": DecodeOptions(beam_size=2).to_dict(), "cell": "gru",
           "resume": False, "text_data": [], "cache_dir": "/tmp/c"}
    config = TrainConfig.from_dict(json.loads(upgrade({"settings": json.dumps(old)})["config"]))
    assert (config.workers, config.decode.beam_size, config.cell, config.batch_size) == (0, 2, "gru", 4)
    assert "config" not in upgrade({})


def test_self_critical_baseline_is_the_mean_of_the_other_samples():
    from captioner.train import self_critical_advantage

    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    advantage, baseline = self_critical_advantage(rewards)
    assert torch.allclose(baseline, torch.tensor([[2.5, 2.0, 1.5], [0.5, 0.5, 0.5]]))
    assert torch.allclose(advantage, torch.tensor([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]))  # equal samples: no signal


def test_sampled_captions_end_once_and_their_log_probs_match_the_decoder(synthetic):
    from captioner.train import allowed_words, sample_captions, sample_log_probs
    from captioner.vocab import END_ID, PAD_ID

    decoder, vocab, features = synthetic
    allowed = allowed_words(4, len(vocab), features.device)
    torch.manual_seed(0)
    samples = sample_captions(decoder, features.repeat_interleave(8, 0), None, None, allowed)
    assert samples.size(1) <= 5 and (samples[:, 0] != END_ID).all()
    for row in samples.tolist():
        n = row.index(END_ID) + 1  # every sample ends, within max_length + 1 tokens
        assert n >= 2 and min(row[:n - 1]) > 3 and set(row[n:]) <= {PAD_ID}  # words, <END>, padding
    start = torch.full((len(samples), 1), 1, dtype=torch.long)
    with torch.no_grad():
        logits = decoder(features.repeat_interleave(8, 0), torch.cat([start, samples[:, :-1]], 1))
        log_probs = sample_log_probs(logits, samples, allowed)
    assert torch.isfinite(log_probs).all() and (log_probs <= 0).all()
    # A sample of the trained caption itself, drawn by a confident decoder, has log-prob near 0.
    assert log_probs.max() > -1


@pytest.mark.parametrize("attention", [False, True])
def test_scst_steps_raise_the_cider_of_the_greedy_caption(synthetic, attention):
    """An untrained decoder (pooled, or attending over random maps); a few SCST steps
    towards each image's reference raise the CIDEr-D of its greedy captions (and of its
    samples)."""
    from types import SimpleNamespace

    from captioner.cider import CiderD
    from captioner.model import CaptionDecoder, ModelConfig, greedy_search
    from captioner.options import TrainConfig
    from captioner.train import allowed_words, scst_batch_loss
    from captioner.vocab import END_ID

    _, vocab, features = synthetic  # four random 16-d features and a vocabulary of SYNTHETIC_CAPTIONS
    references = ["a cat sits on the chair", "a rocket on the launch pad", "a cup of coffee",
                  "two dogs play in the snow"]
    cider = CiderD({i: [vocab.encode(c)[1:]] for i, c in enumerate(references)})  # <END> counted, <START> not
    torch.manual_seed(0)
    decoder = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=16, embed_dim=32, hidden_dim=64,
                                         dropout=0.0, attention=attention, attention_dim=16))
    spatial = torch.randn(4, 49, 16, generator=torch.Generator().manual_seed(2)) if attention else None
    images = torch.arange(4)

    def greedy_reward():
        decoder.eval()
        captions = [r[0][0] + [END_ID] for r in greedy_search(decoder, features, max_length=8, spatial=spatial)]
        decoder.train()
        return cider.score(images.tolist(), captions).mean()

    config = TrainConfig(data="d", out="o", max_caption_length=8, scst_samples=5)
    model = SimpleNamespace(decoder=decoder)

    def step(features, spatial, tokens, concepts):  # TrainStep's signature, on features
        return decoder(features, tokens, concepts, spatial)

    allowed = allowed_words(8, len(vocab), features.device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    before, rewards = greedy_reward(), []
    for _ in range(30):
        loss, r = scst_batch_loss(model, step, features, spatial, None, images, cider, config, allowed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(r.mean().item())
    assert greedy_reward() > before + 0.5, (before, greedy_reward(), rewards)
    assert sum(rewards[-5:]) > sum(rewards[:5]) + 1


def test_scst_objective_trains_resumes_and_is_kept(tmp_path, dataset, feature_cache):
    run = tmp_path / "run"
    text = tmp_path / "text.txt"
    text.write_text("a zebra stands in a field\n")
    train(dataset, run, feature_cache, "--epochs", 1, "--objective", "scst", "--scst-samples", 3,
          "--text-data", text)
    [row] = _rows(run)
    assert row["captions"] == 3 * 3  # 3 readable training photos x 3 samples; text-only captions are not sampled
    assert row["train_reward"] >= 0 and row["train_advantage"] >= 0 and row["train_time_s"] >= 0
    assert read_checkpoint(run / "last.safetensors")[4]["train_config"]["objective"] == "scst"
    assert Image.open(run / "curves.png").format == "PNG"
    train(dataset, run, feature_cache, "--epochs", 2, "--resume")
    assert [r["epoch"] for r in _rows(run)] == [1, 2] and "train_reward" in _rows(run)[1]
    result = CliRunner().invoke(main, [str(a) for a in ["train", "--data", dataset, "--out", run, "--cache-dir",
                                                         feature_cache, "--resume", "--epochs", 3, "--objective",
                                                         "xe"]])
    assert result.exit_code == 1 and "--objective was 'scst', now 'xe'" in result.output, result.output
    result = CliRunner().invoke(main, [str(a) for a in ["train", "--data", dataset, "--out", tmp_path / "tuned",
                                                         "--cache-dir", feature_cache, "--objective", "scst",
                                                         "--fine-tune-encoder"]])
    assert result.exit_code == 1 and "cannot be combined with --fine-tune-encoder" in result.output
    result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(tmp_path / "x"),
                                       "--scst-samples", "1"])
    assert result.exit_code == 2 and "--scst-samples" in result.output


def test_small_data_starts_from_the_shipped_model(tmp_path, dataset, feature_cache, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(main, ["train", "--data", str(dataset), "--out", str(run), "--cache-dir",
                                           str(feature_cache), "--epochs", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "4 training photos: starting from the shipped model" in caplog.text and "--from-scratch" in caplog.text
    config = read_checkpoint(run / "best.safetensors")[4]["train_config"]
    assert config["init_from"] == "default" and config["lr"] == 1e-4 and not config["from_scratch"]
    retrained = Captioner.from_pretrained(run / "best.safetensors", device="cpu")
    assert "cat" in retrained.caption(dataset.parent / "cat.jpg")["caption"].split()  # sensible, not collapsed
    # The shipped person detector reads the same frozen features: kept. The confidence is the decoder's: not.
    assert retrained.model.person_head is not None and retrained.model.calibration is None
    assert "run `captioner calibrate`" in caplog.text


def test_a_small_run_from_scratch_far_under_the_shipped_model_is_warned_about(monkeypatch, caplog):
    import captioner.train as train_module
    from captioner.options import TrainConfig
    from captioner.train import Processes, warn_if_far_under_the_shipped_model

    monkeypatch.setattr(train_module, "evaluate", lambda *args: ({"CIDEr": 0.5}, {}, 0.0))
    config = TrainConfig(data="d", out="o", from_scratch=True)
    with caplog.at_level(logging.WARNING):
        warn_if_far_under_the_shipped_model(0.2, 60, None, torch.device("cpu"), config, Processes())
    assert "best val CIDEr 0.2000 is far under the shipped model's 0.5000" in caplog.text
    assert "60 photos are too few" in caplog.text and "drop --from-scratch" in caplog.text
    caplog.clear()
    warn_if_far_under_the_shipped_model(0.45, 60, None, torch.device("cpu"), config, Processes())
    assert not caplog.text


def test_a_pooled_model_warm_starts_an_attention_model_that_captions_as_it_did(tmp_path, dataset, trained_checkpoint,
                                                                              trained_model, photo_features,
                                                                              photo_maps):
    """--init-from a pooled checkpoint with --arch attention (the default): the new model
    starts out giving the old one's next-word probabilities (its context weights start at
    zero) and learns to read the map from there; --arch pooled keeps the plain decoder."""
    from captioner.options import TrainConfig
    from captioner.train import build_model
    from captioner.train_data import read_training_records

    config = TrainConfig(data=dataset, out=tmp_path / "run", init_from=str(trained_checkpoint), min_word_count=1)
    train_set, val_set, text_captions = read_training_records(config)
    model, vocab = build_model(config, train_set, text_captions, None, torch.device("cpu"))
    assert model.config.attention and not trained_model.config.attention
    old_words = trained_model.config.vocab_size
    tokens = torch.tensor([[1, 4, 5, 6, 7], [1, 8, 9, 10, 11], [1, 4, 4, 4, 4], [1, 12, 13, 14, 15]])
    with torch.no_grad():
        new = model.decoder.eval()(photo_features, tokens, None, photo_maps)[..., :old_words]
        old = trained_model.decoder(photo_features, tokens)
    assert torch.allclose(new, old, atol=1e-5)
    pooled, _ = build_model(config.replace(arch="pooled"), train_set, text_captions, None, torch.device("cpu"))
    assert not pooled.config.attention
