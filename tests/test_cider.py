import math
import random

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from captioner.cider import CiderD, ngram_counts

# A few images' reference captions, written for these tests (lower case, space separated, as pycocoevalcap
# expects): repeated words and n-grams, plurals, and 3 to 5 references per image.
REFERENCES = {
    "dog_beach": [
        "a black dog runs along the beach",
        "a dog is running on the sand near the water",
        "a black and white dog runs on the beach",
        "the dog runs through the shallow water on the beach",
        "a dog running on a beach",
    ],
    "kids_pool": [
        "two children are swimming in a pool",
        "kids splash in the swimming pool",
        "two kids play in the water of a pool",
        "children swimming in a blue pool",
    ],
    "climber": [
        "a man climbs a rock wall",
        "a climber scales a steep rock face",
        "a man in a red shirt is climbing a rock",
        "a person rock climbing",
        "a man climbing up the side of a cliff",
    ],
    "dogs_snow": [
        "two dogs play in the snow",
        "two brown dogs running through the snow",
        "dogs chase each other in deep snow",
    ],
    "street": [
        "a crowd of people walk down a busy city street",
        "people walking on a street at night",
        "many people crossing a street in the city",
        "a busy street with people and cars",
    ],
}

# One candidate per image, as a model might write them: good and bad, short and long, with repeats ("a dog a
# dog"), a word no reference has ("surfboard"), plurals where the references have singulars.
CANDIDATES = {
    "dog_beach": "a black dog is running on the beach",
    "kids_pool": "two kids swimming in a pool",
    "climber": "a man a man climbing climbing a rock wall with a rope and a surfboard near the top of a cliff",
    "dogs_snow": "dog",
    "street": "a dog a dog on the streets",
}


def test_matches_pycocoevalcap_cider():
    # Built from the evaluation set's own references (as pycocoevalcap computes df) with one candidate per image,
    # CiderD is pycocoevalcap's Cider, per image and on average.
    expected_mean, expected = Cider().compute_score(REFERENCES, {i: [c] for i, c in CANDIDATES.items()})
    scores = CiderD(REFERENCES).score(list(CANDIDATES), list(CANDIDATES.values()))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert abs(scores.mean() - expected_mean) < 1e-6
    assert scores.min() >= 0 and scores.max() > 1  # the test data is not degenerate


@pytest.mark.parametrize("seed", range(5))
def test_matches_pycocoevalcap_on_shuffled_captions(seed):
    # Candidates taken from other images' references and mixed up, plus each image's own first reference scored
    # against the rest (the human baseline), an empty candidate, and a single unknown word.
    rng = random.Random(seed)
    pool = [c for refs in REFERENCES.values() for c in refs]
    gts = {f"{i}/{k}": refs[1:] if k == 0 else refs for i, refs in REFERENCES.items() for k in range(3)}
    res = {}
    for key in gts:
        image, k = key.split("/")
        if k == "0":
            res[key] = [REFERENCES[image][0]]
        else:
            words = " ".join(rng.sample(pool, 2)).split()
            res[key] = [" ".join(words[: rng.randint(0, len(words))])]
    res[next(iter(res))] = ["zebra"]
    expected_mean, expected = Cider().compute_score(gts, res)
    scores = CiderD(gts).score(list(res), [res[key][0] for key in res])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert abs(scores.mean() - expected_mean) < 1e-6


def test_cider_d_by_hand():
    # Two training images. N = 2, so idf = log 2 - log df: "a" (in both images) weighs 0, every other n-gram of
    # the references log 2 =: L, and an n-gram of no reference ("cat cat") also L (df 0 -> log max(1, 0) = 0).
    scorer = CiderD({"cat": ["a cat", "a black cat"], "dog": ["a dog"]})
    # Candidate "cat cat" (tf 2 -> weight 2L) for image "cat". Orders 3 and 4 are empty (cosine 0), and the
    # bigram "cat cat" matches nothing, so only unigrams count:
    #   vs "a cat":       min(2L, L) * L / (|2L| * |(0, L)|)       = 1/2,  length 2 vs 2: penalty 1
    #   vs "a black cat": min(2L, L) * L / (|2L| * |(0, L, L)|)    = 1/(2 sqrt 2), length 2 vs 3: exp(-1/72)
    # Each is averaged over the 4 orders, then over the 2 references, times 10.
    expected = 10 * (1 / 2 / 4 + math.exp(-1 / 72) / (2 * math.sqrt(2)) / 4) / 2
    assert scorer.score(["cat"], ["cat cat"])[0] == pytest.approx(expected, abs=1e-12)
    # Clipping matters: unclipped, the first unigram cosine would be 2L * L / (2L * L) = 1.
    assert expected < 10 * (1 / 4 + math.exp(-1 / 72) / math.sqrt(2) / 4) / 2
    # Document frequencies come from all the references the scorer was built with, not from the batch: scored on
    # its own, image "cat" still has N = 2 (a batch-only df would give N = 1, every weight 0, score 0).
    assert scorer.score(["cat", "dog"], ["cat cat", "a dog"])[0] == pytest.approx(expected, abs=1e-12)
    # An exact copy of the one reference of "dog": cosines 1, 1, 0, 0 (no 3- or 4-grams) -> 10 * 2/4.
    assert scorer.score(["dog"], ["a dog"])[0] == pytest.approx(5.0, abs=1e-12)
    # "black cat" (weights: black L, cat L; bigram "black cat" L), one word shorter than "a black cat":
    #   vs "a cat":       unigram cos L*L / (L*sqrt2 * L) = 1/sqrt2, bigrams disjoint, penalty 1 -> (1/sqrt2) / 4
    #   vs "a black cat": unigram cos 2L^2 / (L*sqrt2 * L*sqrt2) = 1 ("a" weighs 0), bigram cos L*L / (L * L*sqrt2)
    #                     = 1/sqrt2, penalty exp(-1/72)                                 -> (1 + 1/sqrt2) / 4
    expected = 10 * ((1 / math.sqrt(2)) / 4 + (1 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)) / 2
    assert scorer.score(["cat"], ["black cat"])[0] == pytest.approx(expected, abs=1e-12)


def test_several_candidates_per_image_and_order():
    scorer = CiderD(REFERENCES)
    pairs = [(image, caption) for image, refs in REFERENCES.items() for caption in refs[:2] + [CANDIDATES[image]]]
    pairs += [("dog_beach", "a dog"), ("dog_beach", "two dogs play in the snow"), ("street", "")]
    image_ids, captions = zip(*pairs, strict=True)
    scores = scorer.score(image_ids, captions)
    assert scores.shape == (len(pairs),) and scores.dtype == np.float64
    # Each candidate alone gives the same score as in the batch: nothing leaks between candidates.
    alone = np.array([scorer.score([i], [c])[0] for i, c in pairs])
    np.testing.assert_allclose(scores, alone, rtol=0, atol=1e-12)
    # Shuffling the (image, candidate) pairs shuffles the scores.
    order = np.random.default_rng(0).permutation(len(pairs))
    shuffled = scorer.score([image_ids[k] for k in order], [captions[k] for k in order])
    np.testing.assert_allclose(shuffled, scores[order], rtol=0, atol=1e-12)
    # The right image's caption beats another image's; an empty candidate scores 0, and so does a caption
    # scored against an image that has none of its n-grams.
    by_pair = dict(zip(pairs, scores, strict=True))
    assert by_pair[("dog_beach", "a dog")] > by_pair[("dog_beach", "two dogs play in the snow")]
    assert by_pair[("street", "")] == 0
    assert scorer.score(["street"], [[]])[0] == 0
    assert scorer.score(["kids_pool"], ["zebra giraffe"])[0] == 0
    assert len(scorer.score([], [])) == 0


def test_copy_of_a_reference_scores_high():
    scorer = CiderD(REFERENCES)
    for image, refs in REFERENCES.items():
        copy = scorer.score([image] * len(refs), refs)
        # A reference matches itself exactly: cosine 1 for each of the 4 orders (all have 4+ words), so at least
        # 10 / (number of references) even before the other references add theirs...
        assert copy.min() >= 10 / len(refs)
        # ... well above the other images' captions. (Not always above a good candidate that shares n-grams with
        # several references: CIDEr rewards consensus, and a copy of an unusual reference has little of it.)
        others = [c for i, captions in REFERENCES.items() if i != image for c in captions + [CANDIDATES[i]]]
        assert copy.min() > 2 * scorer.score([image] * len(others), others).max()


def test_token_ids_work_like_words():
    captions = [r for refs in REFERENCES.values() for r in refs] + list(CANDIDATES.values()) + ["zebra"]
    words = sorted({w for caption in captions for w in caption.split()})
    vocab = {w: k for k, w in enumerate(words, start=4)}  # ids as a trainer's vocabulary would have them
    encode = lambda caption: [vocab[w] for w in caption.split()]  # noqa: E731
    by_words = CiderD(REFERENCES)
    by_ids = CiderD({i: [encode(r) for r in refs] for i, refs in REFERENCES.items()})
    image_ids, captions = list(CANDIDATES) + ["street"], list(CANDIDATES.values()) + ["zebra zebra on a street"]
    expected = by_words.score(image_ids, captions)
    ids = [encode(c) for c in captions]
    np.testing.assert_array_equal(by_ids.score(image_ids, ids), expected)
    np.testing.assert_array_equal(by_ids.score(image_ids, [np.array(c) for c in ids]), expected)
    np.testing.assert_array_equal(by_ids.score(image_ids, [torch.tensor(c) for c in ids]), expected)
    # Word lists work like strings.
    np.testing.assert_array_equal(by_words.score(image_ids, [c.split() for c in captions]), expected)
    # With a device, a float32 tensor for the trainer.
    rewards = by_ids.score(image_ids, [torch.tensor(c) for c in ids], device="cpu")
    assert rewards.dtype == torch.float32 and rewards.shape == (len(ids),)
    torch.testing.assert_close(rewards, torch.from_numpy(expected).float())


def test_ngram_counts():
    counts = ngram_counts("a dog a dog".split())
    assert counts[("a",)] == 2 and counts[("a", "dog")] == 2 and counts[("dog", "a")] == 1
    assert counts[("a", "dog", "a", "dog")] == 1 and sum(counts.values()) == 4 + 3 + 2 + 1
    assert ngram_counts([]) == {}


def test_errors():
    scorer = CiderD(REFERENCES)
    with pytest.raises(KeyError):
        scorer.score(["no such image"], ["a dog"])
    with pytest.raises(ValueError):
        scorer.score(["street", "climber"], ["a dog"])
    with pytest.raises(ValueError):
        CiderD({})
    with pytest.raises(ValueError):
        CiderD({"street": []})
