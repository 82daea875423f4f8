"""Encoder, vocabulary, decoder, decoding, checkpoints and the Captioner API."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from captioner import Captioner, CheckpointError, ImageError, load_model, save_checkpoint
from captioner.encoder import load_encoder
from captioner.images import load_image, preprocess
from captioner.model import CaptionDecoder, ModelConfig, beam_search, greedy_search
from captioner.vocab import END_ID, START_ID, UNK_ID, Vocabulary, tokenize


def test_pretrained_encoder_classifies_real_photos(photos):
    encoder = load_encoder()
    x = torch.stack([preprocess(photos["cat"]), preprocess(photos["coffee"])])
    with torch.no_grad():
        top3 = encoder.classify(x).topk(3).indices.tolist()
    assert set(top3[0]) & set(range(281, 286)), top3[0]  # tabby/tiger/Persian/Siamese/Egyptian cat
    assert set(top3[1]) & {967, 968}, top3[1]  # espresso / cup
    with torch.no_grad():
        assert encoder(x).shape == (2, 1280)
        assert encoder.forward_features(x).shape == (2, 1280, 7, 7)  # kept for attention decoders


def test_tokenizer():
    assert tokenize("A dog's ball, RED.") == ["a", "dog's", "ball", "red"]
    assert tokenize("Two-dogs  run!\n") == ["two", "dogs", "run"]
    assert tokenize("...") == []


def test_vocabulary_round_trip():
    captions = ["a dog runs", "A dog sits.", "a cat sits", "a zebra"]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.itos[:4] == ["<PAD>", "<START>", "<END>", "<UNK>"]
    assert vocab.itos[4:] == ["a", "dog", "sits"]  # by frequency, then alphabetically
    ids = vocab.encode("A dog sits on a zebra")
    assert ids[0] == START_ID and ids[-1] == END_ID and UNK_ID in ids
    assert vocab.decode(ids) == "a dog sits a"  # special tokens, <UNK> included, are not words
    assert vocab.decode([START_ID, 4, 5, END_ID, 6]) == "a dog"  # stops at <END>
    assert vocab.encode("a dog sits", max_length=2) == [START_ID, 4, 5, END_ID]
    again = Vocabulary.from_json(vocab.to_json())
    assert again == vocab and again.stoi == vocab.stoi
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])


def _train_decoder(config, features, captions, vocab, steps=200):
    torch.manual_seed(0)
    decoder = CaptionDecoder(config)
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(vocab.encode(c)) for c in captions], batch_first=True)
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = decoder(features, tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                                 ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return decoder.eval()


@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("gru", 2), ("rnn", 1)])
def test_tiny_decoder_learns_its_captions(cell, layers):
    captions = ["a cat sits on the chair", "a rocket on the pad", "a cup of coffee"]
    vocab = Vocabulary.build(captions, min_count=1)
    config = ModelConfig(vocab_size=len(vocab), feature_dim=16, embed_dim=32, hidden_dim=64,
                         num_layers=layers, cell=cell, dropout=0.0)
    features = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    decoder = _train_decoder(config, features, captions, vocab)
    greedy = [vocab.decode(h[0][0]) for h in greedy_search(decoder, features)]
    beam = [vocab.decode(h[0][0]) for h in beam_search(decoder, features, beam_size=3)]
    assert greedy == captions
    assert beam == captions  # and both stopped at <END> rather than running to max_length


@pytest.fixture(scope="module")
def random_decoder():
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=30, feature_dim=16, embed_dim=16, hidden_dim=32, dropout=0.0)
    return CaptionDecoder(config).eval()


def test_greedy_equals_beam_size_one(random_decoder):
    features = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    greedy = greedy_search(random_decoder, features, max_length=12)
    beam = beam_search(random_decoder, features, beam_size=1, max_length=12)
    for g, b in zip(greedy, beam):
        assert g[0][0] == b[0][0]
        assert g[0][1] == pytest.approx(b[0][1], abs=1e-4)


def test_beam_search_nbest_sorted_and_batched(random_decoder):
    features = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    results = beam_search(random_decoder, features, beam_size=5, n_best=5, max_length=10)
    assert len(results) == 4
    for image in results:
        assert len(image) == 5
        scores = [s for _, _, s in image]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(ids) for ids, _, _ in image}) == 5  # distinct candidates
        for ids, log_prob, score in image:
            assert 1 <= len(ids) <= 10
            assert log_prob <= 0
    # Batching does not change an image's result.
    alone = beam_search(random_decoder, features[2:3], beam_size=5, n_best=5, max_length=10)
    assert [ids for ids, _, _ in alone[0]] == [ids for ids, _, _ in results[2]]


def test_unk_never_emitted_and_max_length_respected(random_decoder):
    config = random_decoder.config
    decoder = CaptionDecoder(config).eval()
    decoder.load_state_dict(random_decoder.state_dict())
    with torch.no_grad():
        decoder.out.bias[UNK_ID] = 100.0  # the model wants <UNK> at every step
        decoder.out.bias[END_ID] = -100.0  # and never wants to stop
    features = torch.randn(3, 16)
    for hyps in beam_search(decoder, features, beam_size=4, n_best=4, max_length=7) + \
            greedy_search(decoder, features, max_length=7):
        for ids, _, _ in hyps:
            assert UNK_ID not in ids
            assert 1 <= len(ids) <= 7


def test_checkpoint_round_trip(tmp_path, tiny_model, tiny_vocab, photos):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, tiny_vocab, {"name": "t"})
    model, vocab, info = load_model(path)
    assert vocab == tiny_vocab and info["name"] == "t" and model.config == tiny_model.config
    x = preprocess(photos["cat"]).unsqueeze(0)
    with torch.no_grad():
        f = tiny_model.encode_images(x)
        assert torch.allclose(model.encode_images(x), f)
        tokens = torch.tensor([[1, 4, 5]])
        assert torch.allclose(model.decoder(f, tokens), tiny_model.decoder(f, tokens))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("decoder.") for k in keys)  # frozen encoder not stored


def test_checkpoint_with_tuned_encoder_stores_it(tmp_path, tiny_vocab):
    from captioner.model import CaptionModel
    model = CaptionModel(ModelConfig(vocab_size=len(tiny_vocab), embed_dim=8, hidden_dim=8))
    with torch.no_grad():
        model.encoder._conv_stem.weight.mul_(0.5)
    model.encoder_tuned = True
    save_checkpoint(tmp_path / "ft.safetensors", model, tiny_vocab)
    loaded, _, _ = load_model(tmp_path / "ft.safetensors")
    assert loaded.encoder_tuned
    assert torch.equal(loaded.encoder._conv_stem.weight, model.encoder._conv_stem.weight)


def test_checkpoint_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    raw = tiny_checkpoint.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_model(tmp_path / "trunc.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_model(tmp_path / "other.safetensors")

    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(tiny_checkpoint), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tiny_checkpoint))
    save_file(tensors, str(tmp_path / "v9.safetensors"), {**meta, "format_version": "9"})
    with pytest.raises(CheckpointError, match="format version 9"):
        load_model(tmp_path / "v9.safetensors")
    config = json.loads(meta["config"])
    save_file(tensors, str(tmp_path / "cfg.safetensors"),
              {**meta, "config": json.dumps({**config, "hidden_dim": 64})})
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path / "cfg.safetensors")
    save_file(tensors, str(tmp_path / "voc.safetensors"), {**meta, "vocab": json.dumps(json.loads(meta["vocab"])[:-1])})
    with pytest.raises(CheckpointError, match="vocabulary has"):
        load_model(tmp_path / "voc.safetensors")


def test_captioner_accepts_paths_pil_bytes_and_lists(tmp_path, tiny_checkpoint, photos):
    captioner = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    photos["cat"].save(tmp_path / "cat.jpg")
    one = captioner.caption(tmp_path / "cat.jpg", beam_size=3, n_best=3)
    assert isinstance(one, dict) and one["caption"] and isinstance(one["score"], float)
    assert len(one["alternatives"]) == 2
    assert one["score"] >= max(a["score"] for a in one["alternatives"])
    many = captioner.caption([str(tmp_path / "cat.jpg"), photos["coffee"], (tmp_path / "cat.jpg").read_bytes()])
    assert isinstance(many, list) and len(many) == 3
    assert many[0] == many[2]  # the same photo from a path and from bytes
    assert captioner.caption(photos["cat"], beam_size=1)["caption"]
    with pytest.raises(ImageError):
        captioner.caption(b"definitely not an image")
    with pytest.raises(ValueError):
        captioner.caption(photos["cat"], beam_size=11)


def test_shipped_weights_load_and_caption(photos):
    captioner = Captioner.from_pretrained(device="cpu")
    result = captioner.caption(photos["cat"])
    assert result["caption"].strip() and len(result["caption"].split()) <= 20


def test_load_image_from_path_matches_pil(tmp_path, photos):
    photos["cat"].save(tmp_path / "cat.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "cat.png")), np.asarray(photos["cat"]))
