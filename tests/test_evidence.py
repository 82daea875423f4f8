"""Decoding that does not invent (repeat blocks, banned words) and caption confidence."""
import json
import math

import pytest
import torch

from captioner.chair import repeated_ngram
from captioner.checkpoint import load_model, save_checkpoint
from captioner.evidence import (PERSON_WORDS, SIGNALS, Calibration, PersonHead, auroc, banned_words,
                                fit_logistic, reliability, word_mask)
from captioner.inference import decode_features
from captioner.model import CaptionDecoder, ModelConfig, RepeatRules, beam_search
from captioner.options import DecodeOptions
from captioner.vocab import END_ID, Vocabulary

WORDS = "a dog runs white shirt and the with cat".split()


@pytest.fixture(scope="module")
def looping():
    """A decoder that wants "a white shirt and" over and over, never <END>, and likes "dog"."""
    vocab = Vocabulary(["<PAD>", "<START>", "<END>", "<UNK>"] + WORDS)
    torch.manual_seed(0)
    decoder = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=8, embed_dim=8, hidden_dim=16,
                                         dropout=0.0)).eval()
    ids = vocab.stoi
    cycle = ["a", "white", "shirt", "and"]
    with torch.no_grad():  # the next word depends on the input word only: a loop through `cycle`
        decoder.rnn.weight_hh_l0.zero_()
        decoder.out.weight.zero_()
        decoder.out.bias.fill_(-5.0)
        decoder.out.bias[END_ID] = -3.0
        decoder.embed.weight.zero_()
        for k, word in enumerate(["<START>"] + cycle):
            decoder.embed.weight[ids[word], k] = 10.0
        # LSTM input k -> hidden unit k (gates open), hidden unit k -> the word after it.
        decoder.rnn.weight_ih_l0.zero_()
        decoder.rnn.bias_ih_l0.fill_(0.0)
        decoder.rnn.bias_hh_l0.fill_(0.0)
        H = 16
        for k in range(5):
            decoder.rnn.weight_ih_l0[k, k] = 10.0  # input gate
            decoder.rnn.weight_ih_l0[2 * H + k, k] = 10.0  # cell candidate
            decoder.rnn.weight_ih_l0[3 * H + k, k] = 10.0  # output gate
            decoder.rnn.bias_ih_l0[H + k] = -10.0  # forget the previous step
        for k, nxt in enumerate(cycle + ["a"]):
            decoder.out.weight[ids[nxt], k] = 20.0
        decoder.out.bias[ids["dog"]] = 0.0  # a strong second choice
        decoder.init_h.weight.zero_()
        decoder.init_c.weight.zero_()
    return decoder, vocab


def _captions(vocab, results):
    return [vocab.decode(hyps[0][0]) for hyps in results]


def test_block_repeats_stops_a_looping_decoder(looping):
    decoder, vocab = looping
    features = torch.zeros(2, 8)
    free = _captions(vocab, beam_search(decoder, features, beam_size=3, max_length=12))
    assert all(repeated_ngram(c) for c in free)  # the loop it wants: "a white shirt and a white shirt ..."
    rules = RepeatRules(word_mask(vocab, ["a", "the", "with", "and"]), word_mask(vocab, ["dog", "cat", "shirt"]))
    for constraints in (None, [[{vocab.stoi["cat"]}], [{vocab.stoi["dog"]}]]):  # constrained search too
        results = beam_search(decoder, features, beam_size=3, n_best=3, max_length=12, constraints=constraints,
                              repeat_rules=rules)
        for hyps in results:
            for ids, log_prob, _ in hyps:
                words = [vocab.itos[i] for i in ids]
                assert not repeated_ngram(" ".join(words)), words
                assert words[-1] not in ("a", "the", "with", "and") and math.isfinite(log_prob)
        if constraints:
            assert ["cat" in c.split() for c in _captions(vocab, results)] == [True, False]
            assert "dog" in _captions(vocab, results)[1].split()


def test_banned_word_is_never_said(looping):
    decoder, vocab = looping
    features = torch.zeros(2, 8)
    assert "white" in _captions(vocab, beam_search(decoder, features, beam_size=2))[0].split()
    banned = torch.zeros(2, len(vocab))
    banned[0, [vocab.stoi["white"], vocab.stoi["dog"]]] = float("-inf")
    results = beam_search(decoder, features, beam_size=3, n_best=3, max_length=8, banned=banned)
    said = [set(vocab.decode(ids).split()) for ids, _, _ in results[0]]
    assert all(not {"white", "dog"} & words for words in said)
    assert "white" in _captions(vocab, results)[1].split()  # the other image may


def test_banned_words_from_negative_evidence_and_the_person_head(tiny_model, tiny_vocab):
    cmap = tiny_model.concepts
    cat = cmap.index_of_word["cat"]
    concept_p = torch.full((3, len(cmap)), 0.5)
    concept_p[0, cat] = 1e-4  # the classifier rules the cat out
    concept_p[1, cat] = 0.1  # unsure: not banned (5 cat classes x 0.015 = 0.075 < 0.1)
    concept_p[2, cat] = 1e-4
    person_p = torch.tensor([0.9, 0.05, 0.9])
    decode = DecodeOptions()
    banned = banned_words(tiny_model, tiny_vocab, concept_p, person_p, decode) == float("-inf")
    ids = tiny_vocab.stoi
    assert banned[0, ids["cat"]] and not banned[1, ids["cat"]] and banned[2, ids["cat"]]
    assert banned[1, ids["woman"]] and not banned[0, ids["woman"]]  # "woman" is a person word
    assert not banned[:, ids["suit"]].any() and not banned[:, ids["coffee"]].any()  # no objects: never banned
    # Off switches, and a reported object is never banned.
    assert banned_words(tiny_model, tiny_vocab, concept_p, None, decode.replace(absent_threshold=0.0)) is None
    concept_p[0, cat] = 0.9
    assert not (banned_words(tiny_model, tiny_vocab, concept_p, person_p, decode)[0, ids["cat"]] < 0)
    assert {"man", "woman", "people", "girls", "player"} <= set(PERSON_WORDS)


def test_person_head_and_calibration_round_trip(tmp_path, trained_model, tiny_vocab, photo_features):
    torch.manual_seed(0)
    head = PersonHead(trained_model.config.feature_dim)
    calibration = Calibration([0.5, -1.0, -0.5, -0.2, -0.1, 1.0], 0.3, fitted_on="a test")
    trained_model.person_head, trained_model.calibration = head, calibration
    try:
        save_checkpoint(tmp_path / "c.safetensors", trained_model, tiny_vocab, {"name": "calibrated"})
        results = decode_features(trained_model, tiny_vocab, photo_features)
    finally:
        trained_model.person_head = trained_model.calibration = None
    model, _, info = load_model(tmp_path / "c.safetensors")
    assert torch.equal(model.person_head.linear.weight, head.linear.weight)
    assert model.calibration.weights == calibration.weights and model.calibration.bias == calibration.bias
    assert info["calibration"] == {"signals": list(SIGNALS), "fitted_on": "a test"} and info["name"] == "calibrated"
    again = decode_features(model, tiny_vocab, photo_features)
    assert [r["confidence"] for r in again] == [r["confidence"] for r in results]
    assert all(0.0 <= r["confidence"] <= 1.0 for r in results)


def test_fit_logistic_auroc_and_reliability():
    torch.manual_seed(0)
    x = torch.randn(400, 3)
    y = (x[:, 0] - 0.5 * x[:, 2] + 0.3 * torch.randn(400) > 0).float()
    weight, bias = fit_logistic(x * torch.tensor([1.0, 100.0, 0.01]), y, weight_decay=1e-4)  # any scale
    p = torch.sigmoid(x * torch.tensor([1.0, 100.0, 0.01]) @ weight + bias)
    assert auroc(p.tolist(), y.bool().tolist()) > 0.95
    assert abs(float(p.mean()) - float(y.mean())) < 0.02  # calibrated on average
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    rows = reliability([0.1, 0.15, 0.9, 0.95], [False, True, True, True], bins=2)
    assert rows == [(0.0, 0.5, 2, pytest.approx(0.125), 0.5), (0.5, 1.0, 2, pytest.approx(0.925), 1.0)]


@pytest.mark.parametrize("checkpoint", ["trained_checkpoint", "attention_checkpoint"])
def test_calibrate_fits_a_person_head_and_a_confidence(tmp_path, checkpoint, photos, feature_cache, request):
    from click.testing import CliRunner

    from captioner.cli import main

    checkpoint = request.getfixturevalue(checkpoint)  # a pooled model, and one that attends over the maps
    captions = {"cat": "a cat sits on the floor", "rocket": "a rocket on the launch pad",
                "coffee": "a cup of coffee", "astronaut": "a woman in a space suit"}
    rows = ["image,caption,split"]
    for name, img in photos.items():
        img.save(tmp_path / f"{name}.jpg")
        split = "val" if name in ("coffee", "astronaut") else "train"
        rows += [f"{name}.jpg,{captions[name]},{split}", f"{name}.jpg,{captions[name]} again,{split}"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "nobody.txt").write_text("coffee.jpg\nrocket.jpg\n")  # relative to the list's folder
    out = tmp_path / "calibrated.safetensors"
    result = CliRunner().invoke(main, ["calibrate", "--weights", str(checkpoint), "--data",
                                       str(tmp_path / "data.csv"), "--no-people", str(tmp_path / "nobody.txt"),
                                       "--out", str(out), "--cache-dir", str(feature_cache), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "person detector: 2 captioned photos and 2 without anyone" in result.output
    assert "confidence: 2 captions" in result.output
    model, _, info = load_model(out)
    assert model.person_head is not None and model.calibration is not None
    assert model.config.attention == (checkpoint.name == "attention.safetensors")
    assert "validation split" in info["calibration"]["fitted_on"]
    records = CliRunner().invoke(main, ["caption", str(tmp_path / "cat.jpg"), "--weights", str(out)]).stdout
    assert 0.0 <= json.loads(records)["confidence"] <= 1.0
