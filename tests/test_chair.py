"""CHAIR object hallucination on hand-made captions whose answers are worked out by hand."""
import pytest

from captioner.chair import (
    OBJECT_WORDS, chair, leave_one_out, mentioned_objects, plural, reference_objects, repeated_ngram,
)


def test_table_covers_the_80_coco_categories():
    assert len(OBJECT_WORDS) == 80
    assert {"person", "hot dog", "teddy bear", "tv", "hair drier", "dining table"} <= set(OBJECT_WORDS)


@pytest.mark.parametrize("word,expected", [
    ("dog", "dogs"), ("bus", "buses"), ("couch", "couches"), ("puppy", "puppies"), ("guy", "guys"),
    ("man", "men"), ("policeman", "policemen"), ("knife", "knives"), ("sheep", "sheep"),
    ("hot dog", "hot dogs"), ("wine glass", "wine glasses"),
])
def test_plural(word, expected):
    assert plural(word) == expected


@pytest.mark.parametrize("caption,objects", [
    ("A man and a woman sit on a sofa.", ["person", "couch"]),  # synonyms, each object once
    ("Two dogs chase three puppies.", ["dog"]),  # plurals
    ("A boy eats a hot dog.", ["person", "hot dog"]),  # "hot dog" is no dog
    ("A teddy bear on a bed.", ["teddy bear", "bed"]),  # nor a teddy bear a bear
    ("Hot dogs and teddy bears!", ["hot dog", "teddy bear"]),  # phrase plurals
    ("A stop sign by a fire hydrant.", ["stop sign", "fire hydrant"]),
    ("A man rides a motor bike past a parked car.", ["person", "motorcycle", "car"]),
    ("A woman talks on her cell phone.", ["person", "cell phone"]),
    ("People wait at a bus stop.", ["person"]),  # a bus stop needs no bus
    ("A baby elephant and its mother.", ["elephant"]),  # "baby" qualifies, "mother" is left out
    ("A girl in an orange shirt holds oranges.", ["person", "orange"]),  # the colour is no fruit
    ("A cat on a table next to a laptop.", ["cat", "dining table", "laptop"]),
    ("", []),
])
def test_mentioned_objects(caption, objects):
    assert mentioned_objects(caption) == objects


def test_ambiguous_word_takes_the_reading_the_image_has():
    assert mentioned_objects("a man on a bike") == ["person", "bicycle"]  # nothing known: first reading
    assert mentioned_objects("a man on a bike", present={"person", "motorcycle"}) == ["person", "motorcycle"]
    assert reference_objects(["A man rides his bike.", "A motorcyclist on a road."]) == {"person", "motorcycle"}


def test_reference_objects_union_and_implied():
    refs = ["A person stands in the snow.", "A guy with a dog.", "A skier on a slope."]
    # Any reference counts; "skier" is a person with skis (implied on the reference side only).
    assert reference_objects(refs) == {"person", "dog", "skis"}
    assert mentioned_objects("A skier on a slope.") == ["person"]
    # Words inside phrases that name nothing imply nothing: a baseball cap is no ball.
    assert reference_objects(["A man playing baseball."]) == {"person", "sports ball"}
    assert reference_objects(["A man in a baseball cap."]) == {"person"}


def test_synonym_and_plural_are_not_hallucinations():
    refs = {1: ["A person walks a dog.", "A guy with his dog."], 2: ["A dog runs on the beach."]}
    result = chair({1: "A man walks his dog.", 2: "Two dogs on the sand."}, refs)
    assert result["CHAIR-s"] == 0 and result["CHAIR-i"] == 0
    assert result["per_image"] == {1: [], 2: []}
    assert result["mentions"] == 3  # person + dog, dog


def test_hot_dog_and_teddy_bear():
    refs = {1: ["A plate with a hot dog."], 2: ["A teddy bear on a chair."], 3: ["A black dog."]}
    caps = {1: "A hot dog on a plate.", 2: "A teddy bear sits on a chair.", 3: "A dog eats a hot dog."}
    result = chair(caps, refs)
    assert result["per_image"] == {1: [], 2: [], 3: ["hot dog"]}


def test_absent_object_counted_once_per_caption():
    refs = {1: ["A cat sleeps on a bed."]}
    result = chair({1: "A cat and a dog and another dog and two dogs on a bed."}, refs)
    assert result["per_image"] == {1: ["dog"]}
    assert result["mentions"] == 3 and result["hallucinations"] == 1  # cat, dog, bed
    assert result["CHAIR-i"] == pytest.approx(1 / 3)


def test_chair_arithmetic():
    refs = {
        "a": ["A man rides a horse.", "A person on a horse."],
        "b": ["A cat on a couch.", "A kitten on a sofa."],
        "c": ["A bowl of broccoli.", "Broccoli in a bowl."],
        "d": ["A sunset over the sea.", "An orange sky."],
    }
    caps = {
        "a": "A man rides a horse next to a dog.",  # person, horse, dog*      -> 3 mentions, 1 absent
        "b": "A cat sleeps on a couch.",  # cat, couch                        -> 2 mentions, 0 absent
        "c": "A bowl of carrots and a fork on a table.",  # bowl, carrot*, fork*, table* -> 4, 3
        "d": "The sky at dusk.",  # no objects                                -> 0, 0
    }
    result = chair(caps, refs)
    assert result["captions"] == 4
    assert result["CHAIR-s"] == pytest.approx(2 / 4)
    assert result["mentions"] == 9 and result["hallucinations"] == 4
    assert result["CHAIR-i"] == pytest.approx(4 / 9)
    assert result["per_image"] == {"a": ["dog"], "b": [], "c": ["carrot", "fork", "dining table"], "d": []}
    assert sorted(result["hallucinated"]) == [("carrot", 1), ("dining table", 1), ("dog", 1), ("fork", 1)]
    assert result["repeats"] == 0


def test_most_hallucinated_first():
    refs = {i: ["A man in a field."] for i in range(3)}
    caps = {0: "A man with a dog.", 1: "A man with a dog and a frisbee.", 2: "A man and his dog."}
    assert chair(caps, refs)["hallucinated"] == [("dog", 3), ("frisbee", 1)]


def test_no_objects_named_gives_zero_not_an_error():
    result = chair({1: "Something in the distance."}, {1: ["A blurry photo."]})
    assert result["CHAIR-s"] == 0 and result["CHAIR-i"] == 0 and result["mentions"] == 0


def test_bad_input():
    with pytest.raises(ValueError):
        chair({}, {})
    with pytest.raises(ValueError):
        chair({1: "a dog"}, {2: ["a dog"]})


@pytest.mark.parametrize("caption,repeats", [
    ("a man in a white shirt and a white shirt", True),  # "a white shirt" twice
    ("a dog dog runs", True),  # a doubled word
    ("A dog, dog!", True),  # punctuation does not hide it
    ("a dog runs on the beach with a ball", False),
    ("a man in a hat and a woman in a hat", True),  # "in a hat" twice: human captions do this too
    ("a man and a woman and a child", False),  # "and a" twice is a bigram, not a trigram
    ("", False),
])
def test_repeated_ngram(caption, repeats):
    assert repeated_ngram(caption) is repeats


def test_repeated_ngram_n():
    assert repeated_ngram("a man and a woman", n=2) is False
    assert repeated_ngram("a man and a man", n=2) is True


def test_repeats_share():
    caps = {1: "a dog dog", 2: "a cat on a mat", 3: "a red car and a red car", 4: "a bird"}
    refs = {k: ["a dog", "a cat", "a car", "a bird"] for k in caps}
    assert chair(caps, refs)["repeats"] == pytest.approx(2 / 4)


def test_leave_one_out():
    refs = {1: ["A man with a dog.", "A person and a puppy."], 2: ["A cat.", "A cat on a bed."], 3: ["only one"]}
    result = leave_one_out(refs)
    assert result["captions"] == 2  # an image with a single reference has nothing to score against
    assert result["CHAIR-s"] == 0
