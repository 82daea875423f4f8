"""Evidence for what a caption says.

The decoder's language prior comes from photos that mostly show people and dogs, so on an
unfamiliar photo it names people and dogs that are not there. This file keeps a caption to
what the image gives grounds for, and says how far to trust the result:

- `banned_words`: per image, the words the beam search may not use. A concept that the
  encoder's ImageNet classifier all but rules out is negative evidence (118 dog breeds,
  each at ~0, say "no dog"); ImageNet has no person class, so people words rest on the
  `PersonHead`, a logistic regression on the same pooled feature.
- `Calibration`: a caption's `confidence`, the estimated probability that it names nothing
  that is absent, from signals the model has (`caption_signals`), by a logistic
  regression fitted on captioned dev photos (`captioner calibrate`, calibrate.py).

Both are stored in the checkpoint; a model without them decodes as before and gives no
confidence.
"""
import math

import torch
from torch import nn

from .chair import OBJECT_WORDS, mentioned_objects, plural
from .model import RepeatRules
from .vocab import tokenize

# People words: CHAIR's, and words that name people without being unambiguous object
# words for CHAIR ("a couple of cars").
PERSON_WORDS = sorted({w for word in (*OBJECT_WORDS["person"], "couple", "couples", "family", "families")
                       for w in (word, plural(word)) if " " not in w})
# A caption does not end on a word that needs another after it.
NO_END_AFTER = ("a", "an", "the", "with", "of", "and", "in", "on", "at", "to", "his", "her", "their", "its", "is",
                "are", "while", "for", "from", "into", "by", "as", "or", "onto", "through", "near", "next", "under",
                "over")


def repeat_rules_for(vocab, device):
    """The model.RepeatRules of `vocab`: no ending on NO_END_AFTER, no object word (a COCO
    category or a person word) twice after the same word. Cached on the vocabulary."""
    cached = getattr(vocab, "_repeat_rules", None)
    if cached is None:
        objects = [w for w in vocab.itos if mentioned_objects(w)] + PERSON_WORDS
        cached = vocab._repeat_rules = RepeatRules(word_mask(vocab, NO_END_AFTER), word_mask(vocab, objects))
    return RepeatRules(*(mask.to(device) for mask in cached))


def word_mask(vocab, words):
    """(V,) bool: True for the vocabulary ids of `words` (those it has)."""
    mask = torch.zeros(len(vocab), dtype=torch.bool)
    mask[[vocab.stoi[w] for w in words if w in vocab.stoi]] = True
    return mask


class PersonHead(nn.Module):
    """P(someone is in the photo) from the pooled image feature: a logistic regression,
    fitted on captioned photos (a person word in the captions) and photos with nobody."""

    def __init__(self, feature_dim):
        super().__init__()
        self.linear = nn.Linear(feature_dim, 1).requires_grad_(False)  # fitted by fit_logistic, never by autograd

    def forward(self, features):
        """(B, D) -> (B,) probabilities."""
        return torch.sigmoid(self.linear(features.float())).squeeze(1)


def banned_words(model, vocab, concept_p, person_p, decode):
    """(B, V) additive log-prob mask, 0 or -inf, or None when nothing is banned.

    A concept's words are banned when its probability is under decode.absent_threshold
    per ImageNet class it sums (so "dog", 118 breeds, needs more than "cat", 5 classes);
    people words when the person head gives under decode.person_threshold. The words of a
    concept the classifier reports as an object (>= concept_threshold) are never banned:
    grounding may force them."""
    B, cmap = concept_p.size(0), model.concepts
    banned = torch.zeros(B, len(vocab), dtype=torch.bool)
    if decode.absent_threshold > 0:
        per_class = torch.tensor([len(c) for c in cmap.classes], dtype=torch.float)
        limit = (decode.absent_threshold * per_class).clamp(max=decode.concept_threshold)  # (C,)
        absent = (concept_p.float().cpu() < limit).float()  # (B, C)
        banned |= (absent @ concept_words(model, vocab).float()) > 0  # (B, C) @ (C, V)
    if person_p is not None and decode.person_threshold > 0:
        nobody = person_p.cpu() < decode.person_threshold  # (B,)
        banned |= nobody.unsqueeze(1) & word_mask(vocab, PERSON_WORDS).unsqueeze(0)
    reported = (concept_p.float().cpu() >= decode.concept_threshold).float()
    banned &= ~((reported @ concept_words(model, vocab).float()) > 0)
    if not banned.any():
        return None
    return torch.zeros(B, len(vocab)).masked_fill(banned, float("-inf")).to(concept_p.device)


def concept_words(model, vocab):
    """(C, V) bool: each concept's words in the vocabulary that name an object (a COCO
    category, chair.py): "dog", "bench", "pizza", but not "suit" or "water", which a caption
    says of what a photo's main subject wears or stands in, where the classifier, looking
    for one main object, gives no evidence either way. Cached on the model."""
    cached = getattr(model, "_concept_words", None)
    if cached is None or cached.shape != (len(model.concepts), len(vocab)):
        cached = torch.stack([word_mask(vocab, [w for w in ws if mentioned_objects(w)])
                              for ws in model.concepts.words])
        model._concept_words = cached
    return cached


# The signals a caption's confidence is computed from, in this order. Each is cheap and
# comes from what decoding computed anyway.
SIGNALS = (
    "score",  # the caption's length-normalised log-probability
    "people_doubt",  # -log P(person) when the caption names people, else 0
    "concept_doubt",  # -log of the lowest probability among the concepts the caption names, else 0
    "unchecked_objects",  # objects named (COCO categories) that neither the classifier nor the person head covers
    "objects_named",  # objects named in all
    "scene_certainty",  # the classifier's probability of its surest concept
)


def caption_signals(caption, score, concept_p, person_p, concept_map):
    """The SIGNALS of one caption: its text, score, its image's (C,) concept
    probabilities and person probability (None without a person head). -> list of floats."""
    words = tokenize(caption)
    objects = mentioned_objects(caption)
    named = concept_map.in_text(words)
    covered = {obj for obj in objects if obj == "person" or any(w in concept_map.index_of_word
                                                                 for w in obj.split())}
    people = "person" in objects and person_p is not None
    return [
        score,
        -math.log(max(float(person_p), 1e-6)) if people else 0.0,
        -math.log(max(min(float(concept_p[c]) for c in named), 1e-6)) if named else 0.0,
        float(len(set(objects) - covered)),
        float(len(objects)),
        float(concept_p.max()) if len(concept_p) else 0.0,
    ]


class Calibration:
    """confidence = sigmoid(weights . signals + bias), the weights fitted on dev data."""

    def __init__(self, weights, bias, signals=SIGNALS, fitted_on=""):
        if len(weights) != len(signals):
            raise ValueError(f"calibration: {len(weights)} weights for {len(signals)} signals")
        self.weights, self.bias, self.signals, self.fitted_on = list(weights), float(bias), tuple(signals), fitted_on

    def __call__(self, signals):
        """(N, S) signals -> (N,) confidences in [0, 1]."""
        x = torch.as_tensor(signals, dtype=torch.float64)
        return torch.sigmoid(x @ torch.tensor(self.weights, dtype=torch.float64) + self.bias)

    def tensors(self):
        """The checkpoint tensors that hold it."""
        return {"calibration.weights": torch.tensor(self.weights, dtype=torch.float64),
                "calibration.bias": torch.tensor([self.bias], dtype=torch.float64)}

    def record(self):
        """What the checkpoint's info says of it."""
        return {"signals": list(self.signals), "fitted_on": self.fitted_on}

    @classmethod
    def from_checkpoint(cls, tensors, info):
        """The calibration a checkpoint holds, or None (none fitted, or fitted on signals
        this version does not compute)."""
        record = info.get("calibration") or {}
        if "calibration.weights" not in tensors or tuple(record.get("signals", ())) != SIGNALS:
            return None
        return cls(tensors["calibration.weights"].tolist(), float(tensors["calibration.bias"][0]), SIGNALS,
                   record.get("fitted_on", ""))


def fit_logistic(x, y, sample_weight=None, weight_decay=1e-2, steps=500):
    """A logistic regression of y (N,) in [0, 1] on x (N, S), the inputs standardised while
    fitting and the scale folded back in. -> (weights (S,), bias) on the raw inputs."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    w = torch.ones(len(y)) if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    torch.manual_seed(0)
    linear = nn.Linear(x.size(1), 1)
    opt = torch.optim.LBFGS(linear.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    xn = (x - mean) / std

    def closure():
        opt.zero_grad()
        loss = (nn.functional.binary_cross_entropy_with_logits(linear(xn).squeeze(1), y, reduction="none") * w).sum()
        loss = loss / w.sum() + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = linear.weight.detach().squeeze(0) / std
    bias = float(linear.bias.detach()) - float((weight * mean).sum())
    return weight, bias


def auroc(scores, labels):
    """Area under the ROC curve: the chance that a positive scores above a negative."""
    s, lab = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.bool)
    pos, neg = s[lab], s[~lab]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).double().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).double().mean()
    return float(greater + ties / 2)


def reliability(confidences, labels, bins=5):
    """[(low, high, captions, mean confidence, share correct)] per confidence bin."""
    rows = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if low <= c < high or (b == bins - 1 and c == 1.0)]
        if idx:
            rows.append((low, high, len(idx), sum(confidences[i] for i in idx) / len(idx),
                         sum(labels[i] for i in idx) / len(idx)))
    return rows
