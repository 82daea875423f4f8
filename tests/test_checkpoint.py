"""Checkpoint files (save, load, every way to get them wrong) and the Captioner API on top."""
import json

import pytest
import torch
from conftest import PHOTO_CAPTIONS, image_bytes
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from captioner import Captioner, CheckpointError, ImageError, load_model, save_checkpoint
from captioner.checkpoint import FORMAT_VERSION, read_checkpoint
from captioner.evidence import PERSON_WORDS
from captioner.images import preprocess
from captioner.model import CaptionModel, ModelConfig


def _keys_and_metadata(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys()), f.metadata()


def test_round_trip_gives_identical_outputs(tmp_path, trained_model, tiny_vocab, photos):
    path = tmp_path / "sub" / "m.safetensors"  # parent folders are created
    save_checkpoint(path, trained_model, tiny_vocab, {"name": "t", "epoch": 3})
    assert not list(path.parent.glob("*.tmp"))
    model, vocab, info = load_model(path)
    assert vocab == tiny_vocab and info == {"name": "t", "epoch": 3} and model.config == trained_model.config
    assert not model.training and model.encoder_tuned is False
    for k, v in trained_model.decoder.state_dict().items():
        assert torch.equal(model.decoder.state_dict()[k], v), k
    x = torch.stack([preprocess(photos["cat"]), preprocess(photos["rocket"])])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.encode_images(x), trained_model.encode_images(x),
                                                      strict=True))
    before = Captioner(trained_model, tiny_vocab, "cpu").caption_pixels(x, beam_size=3, n_best=3)
    after = Captioner(model, vocab, "cpu").caption_pixels(x, beam_size=3, n_best=3)
    assert before == after
    assert [r["caption"] for r in after] == [PHOTO_CAPTIONS["cat"], PHOTO_CAPTIONS["rocket"]]
    # A folder holding model.safetensors loads too.
    path.rename(path.parent / "model.safetensors")
    assert load_model(path.parent)[1] == tiny_vocab


def test_metadata_is_plain_json(trained_checkpoint, tiny_vocab):
    _, meta = _keys_and_metadata(trained_checkpoint)
    assert meta["format"] == "captioner" and meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["vocab"]) == tiny_vocab.itos
    assert json.loads(meta["config"])["hidden_dim"] == 64
    assert json.loads(meta["info"]) == {"name": "trained-test"}
    assert len(json.loads(meta["concepts"])["labels"]) == 1000  # the concept map travels with the model


def test_version_1_checkpoint_gets_the_shipped_concepts(tmp_path, trained_checkpoint, photos):
    from captioner.concepts import shipped_concepts

    _, meta = _keys_and_metadata(trained_checkpoint)
    del meta["concepts"]
    path = tmp_path / "v1.safetensors"
    save_file(load_file(str(trained_checkpoint)), str(path), {**meta, "format_version": "1"})
    model, _, _ = load_model(path)
    assert model.concepts.words == shipped_concepts().words
    assert Captioner.from_pretrained(path, device="cpu").caption(photos["cat"])["objects"][0]["word"] == "cat"


def test_frozen_encoder_is_not_stored(trained_checkpoint):
    keys, _ = _keys_and_metadata(trained_checkpoint)
    assert keys and all(k.startswith("decoder.") for k in keys)
    assert trained_checkpoint.stat().st_size < 1_000_000  # the 4.7M-parameter encoder would be ~19 MB


def test_fine_tuned_encoder_is_stored_and_used(tmp_path, tiny_vocab, photos):
    model = CaptionModel(ModelConfig(vocab_size=len(tiny_vocab), embed_dim=8, hidden_dim=8))
    with torch.no_grad():
        model.encoder._conv_stem.weight.mul_(0.5)
        model.encoder._fc.bias.add_(1.0)
    model.encoder_tuned = True
    save_checkpoint(tmp_path / "ft.safetensors", model, tiny_vocab)
    keys, _ = _keys_and_metadata(tmp_path / "ft.safetensors")
    assert any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    loaded, _, _ = load_model(tmp_path / "ft.safetensors")
    assert loaded.encoder_tuned
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v), k
    x = preprocess(photos["cat"]).unsqueeze(0)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded.encode_images(x), model.encode_images(x), strict=True))


def _rewrite(src, dst, **metadata):
    tensors = load_file(str(src))
    _, meta = _keys_and_metadata(src)
    save_file(tensors, str(dst), {**meta, **metadata})
    return dst


def test_missing_truncated_and_foreign_files(tmp_path, trained_checkpoint):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path)  # a folder without model.safetensors
    raw = trained_checkpoint.read_bytes()
    for name, data in {"half": raw[: len(raw) // 2], "header": raw[:6], "empty": b"",
                       "tail": raw[:-10], "garbage": b"\x00" * 100}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
            load_model(tmp_path / name)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), {"format": "pt"})
    with pytest.raises(CheckpointError, match="safetensors file but not a captioner checkpoint"):
        load_model(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_model(tmp_path / "nometa.safetensors")


def test_wrong_version_and_mismatches(tmp_path, trained_checkpoint):
    _, meta = _keys_and_metadata(trained_checkpoint)
    config, vocab = json.loads(meta["config"]), json.loads(meta["vocab"])
    cases = {
        "format version 3": {"format_version": "3"},
        "this captioner reads versions 1, 2": {"format_version": "0"},
        "vocabulary has 20 words but the model expects 21": {"vocab": json.dumps(vocab[:-1])},
        "weights do not match the model config": {"config": json.dumps({**config, "hidden_dim": 32})},
        "weights do not match": {"config": json.dumps({**config, "cell": "gru"})},
        "unknown encoder": {"config": json.dumps({**config, "encoder": "resnet50"})},
        "broken metadata": {"config": "{not json"},
        "broken metadata: ": {"config": json.dumps({**config, "colour": "red"})},
        "broken metadata:": {"vocab": json.dumps(["a", "b"])},
        "broken metadata: concept map": {"concepts": json.dumps({"labels": ["x"], "words": [], "class_concept": [5]})},
        "concepts but the concept map has": {"config": json.dumps({**config, "num_concepts": 7})},
    }
    for message, change in cases.items():
        path = _rewrite(trained_checkpoint, tmp_path / "bad.safetensors", **change)
        with pytest.raises(CheckpointError, match=message):
            load_model(path)
    assert len(vocab) == 21  # the numbers in the messages above


def test_read_checkpoint_needs_no_encoder(trained_checkpoint, tiny_vocab):
    config, vocab, concepts, tensors, info = read_checkpoint(trained_checkpoint)
    assert vocab == tiny_vocab and config.vocab_size == len(vocab) and info["name"] == "trained-test"
    assert tensors["decoder.out.weight"].shape == (len(vocab), 64)


# ---------------------------------------------------------------- Captioner

def test_caption_accepts_path_pil_bytes_and_lists(tmp_path, trained_captioner, photos):
    photos["cat"].save(tmp_path / "cat.jpg")
    expected = PHOTO_CAPTIONS["cat"]
    for source in (tmp_path / "cat.jpg", str(tmp_path / "cat.jpg"), photos["cat"], (tmp_path / "cat.jpg").read_bytes()):
        one = trained_captioner.caption(source)
        assert isinstance(one, dict), type(source)
        assert one["caption"] == expected
        assert isinstance(one["score"], float) and isinstance(one["log_prob"], float) and one["alternatives"] == []
    with open(tmp_path / "cat.jpg", "rb") as f:  # a binary file is one image, not lines of bytes
        assert trained_captioner.caption(f)["caption"] == expected
    assert trained_captioner.caption(bytearray((tmp_path / "cat.jpg").read_bytes()))["caption"] == expected
    many = trained_captioner.caption([tmp_path / "cat.jpg", photos["coffee"], image_bytes(photos["rocket"], "PNG")])
    assert isinstance(many, list) and [r["caption"] for r in many] == \
        [PHOTO_CAPTIONS["cat"], PHOTO_CAPTIONS["coffee"], PHOTO_CAPTIONS["rocket"]]
    assert trained_captioner.caption([photos["astronaut"]])[0]["caption"] == PHOTO_CAPTIONS["astronaut"]
    assert trained_captioner.caption(photos["astronaut"] for _ in range(2))[1]["caption"] == PHOTO_CAPTIONS["astronaut"]
    assert trained_captioner.caption([]) == []


def test_caption_options(trained_captioner, photos):
    three = trained_captioner.caption(photos["cat"], beam_size=3, n_best=3)
    assert len(three["alternatives"]) == 2
    assert three["score"] >= max(a["score"] for a in three["alternatives"])
    assert len({three["caption"]} | {a["caption"] for a in three["alternatives"]}) == 3
    greedy = trained_captioner.caption(photos["cat"], beam_size=1)
    assert greedy["caption"] == three["caption"]
    short = trained_captioner.caption(photos["cat"], max_length=2)
    assert len(short["caption"].split()) <= 2
    for bad in ({"beam_size": 11}, {"beam_size": 0}, {"n_best": 4}, {"max_length": 0}):
        with pytest.raises(ValueError):
            trained_captioner.caption(photos["cat"], **bad)


def test_caption_bad_input_is_image_error(tmp_path, trained_captioner, photos):
    with pytest.raises(ImageError):
        trained_captioner.caption(b"definitely not an image")
    with pytest.raises(ImageError, match="no such file"):
        trained_captioner.caption(tmp_path / "nope.jpg")
    with pytest.raises(ImageError):  # one bad image in a list fails the call
        trained_captioner.caption([photos["cat"], b""])


def test_from_pretrained_errors_and_name(tmp_path, trained_captioner):
    assert trained_captioner.name == "trained-test"
    with pytest.raises(CheckpointError, match="not found"):
        Captioner.from_pretrained(tmp_path / "missing.safetensors", device="cpu")


def test_shipped_weights_load_and_caption(photos):
    captioner = Captioner.from_pretrained(device="cpu")  # weights/model.safetensors
    result = captioner.caption(photos["astronaut"])
    assert result["caption"].strip() and len(result["caption"].split()) <= 20
    assert captioner.name == "show-attend-tell-lite0"
    # Open-world captions: the cat is a cat and the espresso is coffee, by default.
    cat, coffee = captioner.caption([photos["cat"], photos["coffee"]])
    assert "cat" in cat["caption"].split() and cat["objects"][0]["word"] == "cat"
    assert {"coffee", "cup", "mug"} & set(coffee["caption"].split())
    # Honest captions: nobody and no dog in the coffee; every caption says how sure it is.
    assert not set(coffee["caption"].split()) & {*PERSON_WORDS, "dog", "dogs", "puppy"}, coffee["caption"]
    assert all(0.0 <= r["confidence"] <= 1.0 for r in (result, cat, coffee))


def test_loading_skips_random_initialisation_and_restores_it(tmp_path, tiny_model, tiny_vocab, monkeypatch):
    from captioner import checkpoint

    drawn = []
    real = torch.nn.init.uniform_
    monkeypatch.setattr(torch.nn.init, "uniform_", lambda t, *a, **k: drawn.append(t.shape) or real(t, *a, **k))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, tiny_vocab)
    model, _, _ = checkpoint.load_model(path)
    assert drawn == []  # nothing drawn to be overwritten ...
    for name, t in tiny_model.state_dict().items():  # ... and every weight is the checkpoint's or the package's
        assert torch.equal(model.state_dict()[name], t), name
    torch.nn.Linear(2, 2)
    assert drawn  # torch.nn.init works again afterwards
