"""Open-world captions: concepts from the encoder's classifier, constrained beam search,
DecodeOptions, and the `objects` of every result."""
import json

import pytest
import torch
from conftest import SYNTHETIC_CAPTIONS as CAPTIONS
from conftest import sequence_log_prob

from captioner.concepts import CONCEPTS_FILE, ConceptMap, shipped_concepts
from captioner.inference import Captioner, decode_features
from captioner.model import CaptionModel, beam_search
from captioner.options import DecodeOptions


def _words(vocab, hyp):
    return vocab.decode(hyp[0]).split()


def test_forced_word_appears_and_scores_are_true(synthetic):
    decoder, vocab, features = synthetic
    ids = vocab.stoi
    constraints = [[{ids["coffee"]}], [{ids["snow"]}, {ids["chair"]}], [], [{ids["rocket"]}]]
    results = beam_search(decoder, features, beam_size=3, n_best=2, constraints=constraints)
    assert "coffee" in _words(vocab, results[0][0])
    assert {"snow", "chair"} <= set(_words(vocab, results[1][0]))
    assert " ".join(_words(vocab, results[2][0])) == CAPTIONS[2]  # no constraint: its own caption
    assert "rocket" in _words(vocab, results[3][0])
    for f, hyps in zip(features, results, strict=True):
        for token_ids, log_prob, score in hyps:
            assert log_prob == pytest.approx(sequence_log_prob(decoder, f, token_ids), abs=1e-4)
            assert score == pytest.approx(log_prob / (len(token_ids) + 1) ** 0.7, abs=1e-5)


def test_no_constraints_is_plain_beam_search(synthetic):
    decoder, vocab, features = synthetic
    plain = beam_search(decoder, features, beam_size=4, n_best=4, max_length=12)
    assert beam_search(decoder, features, beam_size=4, n_best=4, max_length=12, constraints=[[]] * 4) == plain
    # An empty word set is no constraint either (same search on a wider batch: equal up to rounding).
    empty = beam_search(decoder, features, beam_size=4, n_best=4, max_length=12, constraints=[[set()]] * 4)
    assert [[h[0] for h in r] for r in empty] == [[h[0] for h in r] for r in plain]
    assert [[h[1] for h in r] for r in empty] == [pytest.approx([h[1] for h in r], abs=1e-5) for r in plain]


def test_disjunctive_sets(synthetic):
    decoder, vocab, features = synthetic
    ids = vocab.stoi
    either = {ids["cat"], ids["dogs"]}
    results = beam_search(decoder, features, beam_size=3, constraints=[[either]] * 4)
    for hyps in results:
        assert set(_words(vocab, hyps[0])) & {"cat", "dogs"}
    # The image that says "dogs" on its own keeps its caption: that word meets the set.
    assert " ".join(_words(vocab, results[3][0])) == CAPTIONS[3]
    assert " ".join(_words(vocab, results[0][0])) == CAPTIONS[0]


def test_batched_equals_one_image_at_a_time(synthetic):
    decoder, vocab, features = synthetic
    ids = vocab.stoi
    constraints = [[{ids["snow"]}], [], [{ids["cat"], ids["chair"]}, {ids["pad"]}], [{ids["coffee"]}]]
    batched = beam_search(decoder, features, beam_size=3, n_best=3, max_length=10, constraints=constraints)
    for i in range(4):
        alone = beam_search(decoder, features[i:i + 1], beam_size=3, n_best=3, max_length=10,
                            constraints=[constraints[i]])
        assert [h[0] for h in alone[0]] == [h[0] for h in batched[i]]
        assert [h[1] for h in alone[0]] == pytest.approx([h[1] for h in batched[i]], abs=1e-4)


def test_a_forced_word_fits_even_in_a_short_caption(synthetic):
    decoder, vocab, features = synthetic
    (hyps,) = beam_search(decoder, features[:1], beam_size=2, max_length=2, constraints=[[{vocab.stoi["snow"]}]])
    assert "snow" in _words(vocab, hyps[0]) and len(hyps[0][0]) <= 2


# ---------------------------------------------------------------- the concept map

def test_shipped_map_covers_imagenet_in_order():
    rows = [line.rstrip("\n").split("\t") for line in CONCEPTS_FILE.read_text(encoding="utf-8").splitlines()[1:]]
    assert [int(r[0]) for r in rows] == list(range(1000))
    wnids = [r[1] for r in rows]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000  # the standard class order
    concepts = shipped_concepts()
    label = dict(enumerate(concepts.labels))
    head = {k: concepts.words[c][0] if c >= 0 else None for k, c in enumerate(concepts.class_concept)}
    assert label[285] == "Egyptian cat" and head[285] == "cat" and head[281] == "cat"  # tabby
    assert all(head[k] == "dog" for k in range(151, 269))  # every dog breed
    assert head[967] == "coffee" and label[967] == "espresso"
    assert head[937] == "broccoli" and head[963] == "pizza" and head[340] == "zebra"
    mapped = sum(c >= 0 for c in concepts.class_concept)
    assert 300 < mapped < 1000  # classes with no good caption word map to nothing


def test_every_concept_word_is_in_the_shipped_vocabulary():
    captioner = Captioner.from_pretrained(device="cpu")
    concepts, vocab = captioner.model.concepts, captioner.vocab
    missing = sorted({w for ws in concepts.words for w in ws if w not in vocab.stoi})
    assert not missing
    assert captioner.model.config.num_concepts == len(concepts)


def test_concept_map_round_trip_and_probabilities():
    cmap = ConceptMap(["tabby", "tiger cat", "ox", "rock"], [["cat", "kitten"], ["cow", "cows"]], [0, 0, 1, -1])
    assert ConceptMap.from_json(cmap.to_json()).words == cmap.words
    logits = torch.log(torch.tensor([[0.3, 0.3, 0.1, 0.3]]))
    assert cmap.concept_probs(logits)[0].tolist() == pytest.approx([0.6, 0.1])
    (found,) = cmap.detect(logits, threshold=0.5)
    assert [(o["word"], o["label"]) for o in found] == [("cat", "tabby")] and found[0]["p"] == pytest.approx(0.6)
    assert cmap.in_text("two kittens and a bull".split()) == []  # listed words only, not stems
    assert cmap.in_text("a kitten near cows".split()) == [0, 1]


# ---------------------------------------------------------------- options

def test_decode_options_validate_in_one_place():
    assert DecodeOptions().grounding is True
    for bad in ({"beam_size": 0}, {"beam_size": 11}, {"n_best": 4, "beam_size": 3}, {"max_length": 0},
                {"max_length": 51}, {"concept_threshold": 1.5}, {"max_concepts": 3}, {"grounding": "yes"},
                {"beam_size": 2.5}):
        with pytest.raises(ValueError):
            DecodeOptions(**bad)
    opts = DecodeOptions.from_strings({"beam_size": "5", "grounding": "false", "concept_threshold": "0.3",
                                       "n_best": "", "other": "x"})
    assert (opts.beam_size, opts.grounding, opts.concept_threshold, opts.n_best) == (5, False, 0.3, 1)
    for raw, name in (({"beam_size": "x"}, "beam_size"), ({"grounding": "maybe"}, "grounding")):
        with pytest.raises(ValueError, match=name):
            DecodeOptions.from_strings(raw)


# ---------------------------------------------------------------- grounded decoding of real photos

def test_grounding_forces_the_detected_object(tiny_captioner, photos):
    grounded = tiny_captioner.caption(photos["cat"])
    assert grounded["objects"][0]["word"] == "cat" and grounded["objects"][0]["p"] >= 0.5
    assert grounded["objects"][0]["label"] in ("Egyptian cat", "tabby", "tiger cat")
    assert "cat" in grounded["caption"].split()  # the untrained tiny model says it only when made to
    plain = tiny_captioner.caption(photos["cat"], grounding=False)
    assert plain["objects"] == grounded["objects"]  # still reported
    assert plain["caption"] == tiny_captioner.caption(photos["cat"], max_concepts=0)["caption"]
    assert "cat" not in plain["caption"].split()


def test_concept_outside_the_vocabulary_is_skipped(tiny_model, tiny_vocab, photos):
    from captioner.images import preprocess

    # Same model, but every cat class maps to "lynx", a word the vocabulary lacks.
    base = shipped_concepts()
    words = base.words + [("lynx",)]
    class_concept = [len(words) - 1 if base.words[c][0] == "cat" else c for c in base.class_concept]
    model = CaptionModel(tiny_model.config, concepts=ConceptMap(base.labels, words, class_concept))
    model.load_state_dict(tiny_model.state_dict())
    model.eval()
    features = model.encode_images(preprocess(photos["cat"]).unsqueeze(0))[0].detach()
    (result,) = decode_features(model, tiny_vocab, features)
    assert result["objects"][0]["word"] == "lynx"
    plain = decode_features(model, tiny_vocab, features, DecodeOptions(grounding=False))
    assert result["caption"] == plain[0]["caption"]


def test_results_are_json(trained_captioner, photos):
    result = trained_captioner.caption(photos["coffee"], n_best=2, beam_size=2)
    json.dumps(result)
    assert set(result) == {"caption", "score", "log_prob", "confidence", "alternatives", "objects"}
    assert all(set(o) == {"label", "word", "p"} for o in result["objects"])
