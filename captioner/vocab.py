"""Tokenizer and vocabulary.

Tokenizer: lower-case the text, then keep runs of letters and digits of any script (with
inner apostrophes, so "dog's" stays one word); every other character, punctuation
included, splits words and is dropped. "A dog's ball, red." -> ["a", "dog's", "ball", "red"].
Dropping punctuation matches how captions are scored (the PTB tokenizer of coco-caption
removes it) and keeps the model from spending steps on stray full stops.
"""
import json
import re
from collections import Counter

PAD, START, END, UNK = "<PAD>", "<START>", "<END>", "<UNK>"
SPECIAL_TOKENS = [PAD, START, END, UNK]
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text):
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> id map; ids 0-3 are always <PAD> <START> <END> <UNK>."""

    def __init__(self, words):
        words = list(words)
        if words[:4] != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions, min_count=5):
        """Words seen at least `min_count` times in `captions` (strings), most frequent first."""
        counts = Counter(w for caption in captions for w in tokenize(caption))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIAL_TOKENS + words)

    def __len__(self):
        return len(self.itos)

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, caption, max_length=None):
        """Caption string -> [<START>, word ids..., <END>]; unknown words become <UNK>,
        and at most `max_length` words are kept."""
        words = tokenize(caption)[:max_length]
        return [START_ID] + [self.stoi.get(w, UNK_ID) for w in words] + [END_ID]

    def decode(self, ids):
        """Ids -> caption string, stopping at <END> and skipping the other special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i >= len(SPECIAL_TOKENS):
                words.append(self.itos[i])
        return " ".join(words)

    def to_json(self):
        return json.dumps(self.itos)

    @classmethod
    def from_json(cls, text):
        return cls(json.loads(text))
