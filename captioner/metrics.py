"""Caption scores with pycocoevalcap, the coco-caption scorer that published results use:
BLEU-1..4, METEOR, ROUGE-L and CIDEr over all references of each image.

The standard set-up tokenizes with Stanford's PTB tokenizer and runs METEOR, both in Java.
Without Java, captions are tokenized with `captioner.vocab.tokenize` (lower-case words,
punctuation dropped: close to PTB for plain captions) and METEOR is left out; the result
says which tokenizer was used. SPICE is not offered: it downloads models at run time.
"""
import contextlib
import io
import os
import shutil
import subprocess
import sys
from functools import lru_cache

from .vocab import tokenize


@lru_cache(maxsize=1)
def java_available():
    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for the block: the PTB tokenizer's Java process reports its
    speed there ("PTBTokenizer tokenized 891 tokens at ..."), which is no news to a user."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def score_captions(predictions, references, use_java=None, cider_only=False):
    """predictions: {id: caption}; references: {id: [captions]} (same ids).
    -> {"BLEU-1".."BLEU-4", "METEOR" (Java only), "ROUGE-L", "CIDEr", "tokenizer"}.
    `cider_only` computes BLEU and CIDEr alone, in pure Python (fast, for validation)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise ValueError("predictions and references must cover the same images")
    if not predictions:
        raise ValueError("nothing to score")
    if use_java is None:
        use_java = java_available() and not cider_only
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        with _quiet_stderr():
            gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
            res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    else:
        gts = {k: [" ".join(tokenize(c)) for c in refs] for k, refs in references.items()}
        res = {k: [" ".join(tokenize(predictions[k]))] for k in references}
    scores = {"tokenizer": "ptb" if use_java else "simple"}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
        if not cider_only:
            if use_java:
                scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
            scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores
