"""The coco-caption metric wrapper on hand-made captions with known scores."""
import math

import pytest
from conftest import java_missing

from captioner import metrics
from captioner.metrics import score_captions

REF = "a man rides a red bike down the street"  # 9 words


@pytest.mark.parametrize("use_java", [False, pytest.param(True, marks=java_missing)])
def test_identical_caption_scores_one(use_java):
    refs = {1: [REF + "."], 2: ["Two dogs play in the deep snow", "Dogs in snow."]}
    preds = {1: REF, 2: "two dogs play in the deep snow"}
    scores = score_captions(preds, refs, use_java=use_java)
    assert scores["tokenizer"] == ("ptb" if use_java else "simple")
    for n in (1, 2, 3, 4):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr"] > 1.0
    if use_java:
        assert 0.9 < scores["METEOR"] <= 1.0
    else:
        assert "METEOR" not in scores


def test_bleu_by_hand():
    refs = {1: [REF]}
    # 9 candidate words against 9 reference words: brevity penalty 1. Clipped unigram
    # matches: a, a, rides, down, the -> BLEU-1 = 5/9. Bigram matches: "rides a", "down the"
    # of 8 -> BLEU-2 = sqrt(5/9 * 2/8). No trigram matches: BLEU-3 and BLEU-4 ~ 0.
    part = score_captions({1: "a woman rides a blue horse down the road"}, refs, use_java=False)
    assert part["BLEU-1"] == pytest.approx(5 / 9, abs=1e-6)
    assert part["BLEU-2"] == pytest.approx(math.sqrt(5 / 9 * 2 / 8), abs=1e-6)
    assert part["BLEU-3"] < 1e-3 and part["BLEU-4"] < 1e-3
    # A 3-word prefix: every n-gram matches, but the brevity penalty is exp(1 - 9/3).
    short = score_captions({1: "a man rides"}, refs, use_java=False)
    assert short["BLEU-1"] == pytest.approx(math.exp(-2), abs=1e-6)
    assert short["BLEU-3"] == pytest.approx(math.exp(-2), abs=1e-6)
    # Unigram counts are clipped by the reference counts: "a a a a" matches "a" twice only.
    clipped = score_captions({1: "a a a a a a a a a"}, refs, use_java=False)
    assert clipped["BLEU-1"] == pytest.approx(2 / 9, abs=1e-6)


def test_several_references_and_corpus_level_bleu():
    # BLEU is corpus-level: matches and lengths are summed over images before dividing.
    refs = {"x": ["a dog runs", "the puppy is running fast"], "y": ["a cat sleeps"]}
    preds = {"x": "a puppy runs", "y": "a cat eats"}  # x: a, puppy, runs all match; y: a, cat
    scores = score_captions(preds, refs, use_java=False)
    assert scores["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)  # closest reference lengths 3 + 3: no penalty


def test_tokenization_without_java_drops_case_and_punctuation():
    scores = score_captions({1: "A MAN, rides a red bike -- down the street!"}, {1: [REF]}, use_java=False)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_works_without_java_on_the_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    metrics.java_available.cache_clear()
    try:
        assert not metrics.java_available()
        scores = score_captions({1: REF}, {1: [REF]})  # use_java=None: picks the Java-free path
        assert scores["tokenizer"] == "simple" and "METEOR" not in scores
        assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    finally:
        metrics.java_available.cache_clear()


def test_cider_only_is_fast_subset():
    scores = score_captions({1: REF}, {1: [REF, "someone on a bike"]}, cider_only=True)
    assert scores["tokenizer"] == "simple"
    assert {"BLEU-1", "BLEU-4", "CIDEr"} <= scores.keys() and "ROUGE-L" not in scores and "METEOR" not in scores


def test_bad_inputs():
    with pytest.raises(ValueError, match="same images"):
        score_captions({1: "x"}, {2: ["y"]}, use_java=False)
    with pytest.raises(ValueError, match="nothing to score"):
        score_captions({}, {}, use_java=False)
