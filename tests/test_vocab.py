"""Tokenizer and vocabulary."""
import json

import pytest

from captioner.vocab import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, Vocabulary, tokenize


def test_special_token_ids():
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ["<PAD>", "<START>", "<END>", "<UNK>"]
    vocab = Vocabulary.build(["a dog"], min_count=1)
    assert [vocab.stoi[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]


@pytest.mark.parametrize("text,words", [
    ("A dog's ball, red.", ["a", "dog's", "ball", "red"]),  # the documented example
    ("Two-dogs  run!\n", ["two", "dogs", "run"]),
    ("THREE 3 kids", ["three", "3", "kids"]),
    ("the kids' toys 'quoted'", ["the", "kids", "toys", "quoted"]),  # no leading/trailing apostrophes
    ("rock'n'roll", ["rock'n'roll"]),
    ("...", []),
    ("", []),
])
def test_tokenizer(text, words):
    assert tokenize(text) == words


def test_build_with_min_count_orders_by_frequency():
    captions = ["a dog runs", "A dog sits.", "a cat sits", "a zebra"]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.itos == SPECIAL_TOKENS + ["a", "dog", "sits"]  # by count, then alphabetically
    assert len(vocab) == 7
    everything = Vocabulary.build(captions, min_count=1)
    assert everything.itos[4:] == ["a", "dog", "sits", "cat", "runs", "zebra"]
    assert Vocabulary.build((c for c in captions), min_count=100).itos == SPECIAL_TOKENS  # generators work


def test_encode_decode():
    vocab = Vocabulary.build(["a dog runs", "a dog sits"], min_count=1)
    ids = vocab.encode("A dog runs.")
    assert ids == [START_ID, vocab.stoi["a"], vocab.stoi["dog"], vocab.stoi["runs"], END_ID]
    assert vocab.decode(ids) == "a dog runs"
    assert vocab.encode("a dog runs", max_length=2) == [START_ID, vocab.stoi["a"], vocab.stoi["dog"], END_ID]
    assert vocab.encode("") == [START_ID, END_ID]
    # Unknown words become <UNK>, which is not a word when decoding.
    ids = vocab.encode("a purple dog")
    assert ids == [START_ID, vocab.stoi["a"], UNK_ID, vocab.stoi["dog"], END_ID]
    assert vocab.decode(ids) == "a dog"
    # Decoding stops at <END> and skips <PAD>/<START>; tensors' ints are fine too.
    import torch
    assert vocab.decode(torch.tensor([START_ID, 4, PAD_ID, 5, END_ID, 6])) == "a dog"
    assert vocab.decode([]) == ""


def test_json_round_trip():
    vocab = Vocabulary.build(["a dog's ball", "a café"], min_count=1)
    text = vocab.to_json()
    assert json.loads(text) == vocab.itos
    again = Vocabulary.from_json(text)
    assert again == vocab and again.stoi == vocab.stoi
    assert again != Vocabulary(SPECIAL_TOKENS) and vocab != vocab.itos


def test_invalid_vocabularies():
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["<START>", "<PAD>", "<END>", "<UNK>"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(SPECIAL_TOKENS + ["a", "a"])


def test_tokenizer_keeps_letters_of_any_script():
    assert tokenize("Un café, à Zürich!") == ["un", "café", "à", "zürich"]
