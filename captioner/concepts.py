"""Concepts: the caption words that the encoder's own ImageNet classifier can vouch for.

`imagenet_concepts.tsv` maps each of the 1000 ImageNet classes (standard order: sorted
wnid) to caption words, head word first ("cat cats kitten kittens"); classes with no
good caption word map to nothing. Classes that share a head word form one concept, and
a concept's probability is the sum of its classes' softmax probabilities, so 118 dog
breeds at 0.01 each still make a confident "dog".

The classifier is the encoder's last layer applied to the pooled feature the captioner
already computes: concepts cost one (1280 x 1000) matrix product per image, no second
network. A checkpoint carries the concept map it was trained with, so a model's
grounding does not change when this file does.
"""
import json
from functools import lru_cache
from pathlib import Path

import torch

CONCEPTS_FILE = Path(__file__).resolve().with_name("imagenet_concepts.tsv")


class ConceptMap:
    def __init__(self, labels, words, class_concept):
        """labels: the 1000 class names; words: per concept its words, head first;
        class_concept: per class the index of its concept, or -1."""
        if len(labels) != len(class_concept):
            raise ValueError("concept map: one concept index per class label")
        if any(not w for w in words) or any(not -1 <= c < len(words) for c in class_concept):
            raise ValueError("concept map: broken concept indices or empty word lists")
        self.labels = list(labels)
        self.words = [tuple(w) for w in words]
        self.class_concept = list(class_concept)
        self.classes = [[] for _ in self.words]  # per concept, its class indices
        for k, c in enumerate(self.class_concept):
            if c >= 0:
                self.classes[c].append(k)
        # (num_classes, num_concepts) 0/1: class probabilities @ matrix = concept probabilities
        self.matrix = torch.zeros(len(self.labels), len(self.words))
        for k, c in enumerate(self.class_concept):
            if c >= 0:
                self.matrix[k, c] = 1.0
        self.index_of_word = {}  # any concept word -> its concept (first listed wins)
        for c, ws in enumerate(self.words):
            for w in ws:
                self.index_of_word.setdefault(w, c)

    def __len__(self):
        return len(self.words)

    @classmethod
    def from_tsv(cls, path=CONCEPTS_FILE):
        """Read `index, wnid, label, words` rows (words: space-separated, head first)."""
        labels, class_words = [], []
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split("\t")
            if header != ["index", "wnid", "label", "words"]:
                raise ValueError(f"{path}: header must be index, wnid, label, words")
            for lineno, line in enumerate(f, 2):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 4 or parts[0] != str(len(labels)):
                    raise ValueError(f"{path}:{lineno}: expected row {len(labels)} with 4 tab-separated fields")
                labels.append(parts[2])
                class_words.append(parts[3].split())
        heads = {}  # head word -> concept index; a concept's words are the union over its classes
        words, class_concept = [], []
        for ws in class_words:
            if not ws:
                class_concept.append(-1)
                continue
            if ws[0] not in heads:
                heads[ws[0]] = len(words)
                words.append([])
            c = heads[ws[0]]
            words[c].extend(w for w in ws if w not in words[c])
            class_concept.append(c)
        return cls(labels, words, class_concept)

    def to_json(self):
        return json.dumps({"labels": self.labels, "words": self.words, "class_concept": self.class_concept})

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        return cls(d["labels"], d["words"], d["class_concept"])

    def concept_probs(self, class_logits):
        """(B, num_classes) classifier logits -> (B, num_concepts) concept probabilities."""
        probs = class_logits.float().softmax(dim=-1)
        return probs @ self.matrix.to(probs.device)

    def in_text(self, words):
        """Concepts named by a tokenized caption (any of their words) -> sorted indices."""
        return sorted({self.index_of_word[w] for w in words if w in self.index_of_word})

    def detect(self, class_logits, threshold):
        """Per image, the concepts with probability >= threshold, surest first:
        [[{"label": the concept's likeliest class, "word": head word, "p", "concept"}]]."""
        logits = class_logits.float().cpu()
        concept_p = self.concept_probs(logits)
        found = []
        for b in range(len(logits)):
            hits = (concept_p[b] >= threshold).nonzero().flatten().tolist()
            hits.sort(key=lambda c: -float(concept_p[b, c]))
            found.append([{"label": self.labels[max(self.classes[c], key=lambda k: float(logits[b, k]))],
                           "word": self.words[c][0], "p": round(float(concept_p[b, c]), 4), "concept": c}
                          for c in hits])
        return found


@lru_cache(maxsize=1)
def shipped_concepts():
    """The concept map shipped with the package (for checkpoints that carry none)."""
    return ConceptMap.from_tsv(CONCEPTS_FILE)
