"""CIDEr-D, fast enough to be the reward of self-critical sequence training (SCST).

CIDEr (Vedantam, Zitnick and Parikh, CVPR 2015) compares a candidate caption with the
reference captions of its image as tf-idf vectors of its 1..4-grams: the tf is the n-gram's
count in the caption, the idf is log(N / df) where N is the number of images ("documents")
and df the number of images whose references contain the n-gram. For each n-gram order
n = 1..4 and each reference the score is a cosine similarity; CIDEr-D, the version everyone
reports and optimises, adds two guards against gaming it:

    sim_n(c, r) = sum_g min(c_g, r_g) * r_g / (|c_n| |r_n|)      clipped numerator
                  * exp(-(len(c) - len(r))^2 / (2 * 6^2))          Gaussian length penalty
    CIDEr-D(c)  = 10 * mean_r mean_n sim_n(c, r)

where c_g = tf * (log N - log(max(1, df_g))): an n-gram no reference contains (df 0) gets
the largest weight, log N, and can only lower the score through |c_n|.

Which implementations compute what (checked against their code):

* pycocoevalcap's `Cider` (coco-caption, the metric our evaluation reports): despite its
  name it computes the CIDEr-D formula above (clipping and length penalty included), with
  df and N taken from the references of the images being evaluated, anew on every call.
* self-critical.pytorch's `CiderD(df="coco-train-idxs")` (its `cider` submodule,
  pyciderevalcap/ciderD): the same formula, with df and N computed ONCE from all training
  references (scripts/prepro_ngrams.py) and reused for every SCST batch. Its references and
  samples are strings of token ids with the end token (id 0) appended as a word.
* The `Cider` of that submodule (no clipping, no length penalty) is the paper's plain CIDEr;
  it is not implemented here.

`CiderD(references)` takes df and N from the references it is built with, so the same class
gives both: built from the training references it is SCST's CIDEr-D; built from an
evaluation set's references and given one candidate per image it equals pycocoevalcap's
`Cider` (tests/test_cider.py checks the one against pycocoevalcap, the other on a worked example).

Speed: pycocoevalcap rebuilds every reference's tf-idf vector for every candidate in pure
Python. Here the references become tables (n-gram tfs, norms, lengths) once, in __init__; `score` counts
each candidate's n-grams with a Counter (the only per-caption Python) and does the rest for
the whole batch with a few numpy operations on flat arrays (one row per candidate n-gram).

Tokens: a caption is a string (split on white space, as pycocoevalcap does), or a sequence
of tokens (words, or token ids as ints / a 1-D numpy array or tensor), so the SCST trainer
can pass decoded ids without string work. References and candidates must use the same kind
of token. Cutting at the end token, dropping padding and <START>, and whether <END> counts
are the caller's: SCST (self-critical.pytorch) counts the end token as a word, appending it
to every reference and keeping it at the end of every sample, which rewards ending a caption
where people end theirs.
"""
import math
from collections import Counter
from itertools import chain

import numpy as np
import torch


def as_tokens(caption):
    """A caption as a list of tokens: a string is split on white space, arrays and tensors of ids become lists of
    ints (so that id 5 from a tensor and 5 from a list are the same token)."""
    if isinstance(caption, str):
        return caption.split()
    if isinstance(caption, (np.ndarray, torch.Tensor)):
        return caption.tolist()
    return list(caption)


def ngram_counts(tokens, n=4):
    """Counter of the 1..n-grams of `tokens` (a list), each n-gram a tuple of tokens."""
    # zip(tokens, tokens[1:], ...) yields the k-grams as tuples, in C; it stops at the shortest slice, on purpose.
    return Counter(chain.from_iterable(zip(*(tokens[i:] for i in range(k)), strict=False) for k in range(1, n + 1)))


def segment_sum(index, values, size):
    """Sums of `values` by `index` (ints in 0..size-1) as a float64 array (size,): np.bincount, which returns
    ints when there are no values at all."""
    return np.bincount(index, values, minlength=size).astype(np.float64, copy=False)


class CiderD:
    """CIDEr-D against fixed references, with document frequencies from those references.

    references: {image_id: [caption, ...]} (captions as `as_tokens` takes them), e.g. the
    training set's for SCST. `score(image_ids, candidates)` scores each candidate against
    the references of its image; several candidates may share an image.
    """

    def __init__(self, references, n=4, sigma=6.0):
        if not references:
            raise ValueError("CiderD needs references of at least one image")
        self.n, self.sigma = n, sigma
        self.image_index = {image_id: i for i, image_id in enumerate(references)}
        ref_counts = []  # [image][reference] -> Counter of n-grams
        ref_lengths = []  # [image][reference] -> number of tokens
        for image_id, refs in references.items():
            if len(refs) == 0:
                raise ValueError(f"image {image_id!r} has no references")
            tokens = [as_tokens(r) for r in refs]
            ref_counts.append([ngram_counts(t, n) for t in tokens])
            ref_lengths.append([len(t) for t in tokens])

        # Document frequency: in how many images' references (any of them) each n-gram occurs.
        df = Counter(chain.from_iterable(set().union(*counts) for counts in ref_counts))
        # Every n-gram of the references gets an integer id; the arrays below are indexed by it.
        self.ngram_id = {g: i for i, g in enumerate(df)}
        num_ngrams = len(df)
        self.log_num_images = math.log(len(ref_counts))
        # idf = log N - log df (df >= 1 here). An n-gram of no reference has df 0, and since pycocoevalcap takes
        # log(max(1, df)) its idf is log N: score() gives that to the candidate n-grams missing from ngram_id.
        self.idf = self.log_num_images - np.log(np.fromiter(df.values(), np.float64, num_ngrams))
        ngram_order = np.fromiter(map(len, df), np.int64, num_ngrams) - 1  # 0 for unigrams .. n-1

        # The references as flat arrays, one entry per (image, reference, distinct n-gram).
        image_of, ref_of, ngram_of, tf_of = [], [], [], []
        for i, counts in enumerate(ref_counts):
            for j, c in enumerate(counts):
                image_of += [i] * len(c)
                ref_of += [j] * len(c)
                ngram_of += map(self.ngram_id.__getitem__, c)
                tf_of += c.values()
        image_of, ref_of = np.array(image_of, np.int64), np.array(ref_of, np.int64)
        ngram_of, tf_of = np.array(ngram_of, np.int64), np.array(tf_of, np.float64)
        num_images, self.max_refs = len(ref_counts), max(map(len, ref_counts))

        # Lookup table of reference tfs: one row per (image, n-gram) pair that occurs, found by its key
        # image * num_ngrams + ngram in the sorted `ref_keys` (np.searchsorted in score()). Columns are the
        # image's references; images with fewer than max_refs references have zero columns (tf 0, norm 0, so
        # they add nothing). tfs rather than tf-idf weights, to hold the table in 2-byte ints.
        self.num_ngrams = num_ngrams
        self.ref_keys, row = np.unique(image_of * num_ngrams + ngram_of, return_inverse=True)
        self.ref_tf = np.zeros((len(self.ref_keys), self.max_refs), np.uint16)  # (K, R)
        self.ref_tf[row, ref_of] = tf_of

        # |r_n|: the norm of each reference's tf-idf vector, per n-gram order.
        weight = tf_of * self.idf[ngram_of]
        segment = (image_of * self.max_refs + ref_of) * n + ngram_order[ngram_of]
        norm = segment_sum(segment, weight**2, num_images * self.max_refs * n)
        self.ref_norm = np.sqrt(norm).reshape(num_images, self.max_refs, n).transpose(0, 2, 1)  # (I, n, R)
        # Lengths for the length penalty. pycocoevalcap's "length" counts bigrams (len - 1, or 0 for an empty
        # caption); the difference of two lengths is the same in words whenever both captions have a word, and
        # when one is empty every similarity is 0 anyway, so plain word counts give the same scores.
        self.ref_length = np.zeros((num_images, self.max_refs), np.float64)  # (I, R)
        for i, lengths in enumerate(ref_lengths):
            self.ref_length[i, : len(lengths)] = lengths
        self.num_refs = np.array([len(c) for c in ref_counts], np.float64)  # (I,)

    def _candidate_ngrams(self, candidates):
        """The candidates' n-grams as flat arrays, one entry per (candidate, distinct n-gram):
        (candidate, n-gram id (-1: in no reference), order - 1, term count), and each
        candidate's length. This loop is the only per-caption Python of `score`."""
        cand_of, ngram_of, order_of, tf_of = [], [], [], []
        lengths = np.zeros(len(candidates), np.float64)
        get_id = self.ngram_id.get
        for c, caption in enumerate(candidates):
            tokens = as_tokens(caption)
            lengths[c] = len(tokens)
            counts = ngram_counts(tokens, self.n)
            cand_of += [c] * len(counts)
            ngram_of += [get_id(g, -1) for g in counts]
            order_of += map(len, counts)
            tf_of += counts.values()
        return (np.array(cand_of, np.int64), np.array(ngram_of, np.int64), np.array(order_of, np.int64) - 1,
                np.array(tf_of, np.float64), lengths)

    def score(self, image_ids, candidates, device=None):
        """CIDEr-D of each candidate against the references of its image.

        image_ids: one per candidate (ids given to __init__; repeats allowed). candidates: captions as
        `as_tokens` takes them. Returns a float64 numpy array (C,), or with `device` a float32 tensor there.
        """
        image_ids, candidates = list(image_ids), list(candidates)
        if len(image_ids) != len(candidates):
            raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
        n, num_cands = self.n, len(candidates)
        images = np.array([self.image_index[i] for i in image_ids], np.int64)  # (C,)
        cand_of, ngram_of, order_of, tf_of, lengths = self._candidate_ngrams(candidates)

        # Candidate tf-idf weights c_g and norms |c_n|.
        known = ngram_of >= 0
        idf = np.full(len(ngram_of), self.log_num_images)  # unknown n-grams: df 0 -> idf log N
        idf[known] = self.idf[ngram_of[known]]
        weight = tf_of * idf  # (P,) one per candidate n-gram
        segment = cand_of * n + order_of  # (P,) which (candidate, order) each n-gram adds to
        cand_norm = np.sqrt(segment_sum(segment, weight**2, num_cands * n)).reshape(num_cands, n)

        # Clipped numerator: only n-grams that the candidate's image's references contain add to it. Find each
        # known n-gram's row of the reference table by its (image, n-gram) key. Each distinct key is looked up
        # once and in sorted order: searchsorted is several times faster on sorted queries, and SCST's samples
        # of one image share most of their n-grams.
        p = np.flatnonzero(known)
        keys, key_of = np.unique(images[cand_of[p]] * self.num_ngrams + ngram_of[p], return_inverse=True)
        rows = np.searchsorted(self.ref_keys, keys)  # where each key is, or would be inserted
        hit = rows < len(self.ref_keys)
        hit[hit] = self.ref_keys[rows[hit]] == keys[hit]
        rows, hit = rows[key_of], hit[key_of]  # back to one per known candidate n-gram
        p, rows = p[hit], rows[hit]  # (H,) matched candidate n-grams and their table rows
        ref_weight = self.ref_tf[rows] * idf[p, None]  # (H, R) r_g for each of the image's references
        contribution = np.minimum(weight[p, None], ref_weight) * ref_weight  # (H, R)
        # Sum the contributions per (candidate, order, reference): flatten (C, n, R) to one bincount index.
        index = segment[p, None] * self.max_refs + np.arange(self.max_refs)  # (H, R)
        numerator = segment_sum(index.ravel(), contribution.ravel(), num_cands * n * self.max_refs)
        numerator = numerator.reshape(num_cands, n, self.max_refs)  # (C, n, R)

        # Cosine per (candidate, order, reference); 0 where either vector is empty (its numerator is 0 too).
        denominator = cand_norm[:, :, None] * self.ref_norm[images]  # (C, n, 1) * (C, n, R) -> (C, n, R)
        cosine = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
        delta = lengths[:, None] - self.ref_length[images]  # (C, R)
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2))
        # Mean over orders, penalty, mean over the image's references (padding columns are all 0), times 10.
        scores = 10.0 * (cosine.mean(axis=1) * penalty).sum(axis=1) / self.num_refs[images]  # (C,)
        if device is not None:
            return torch.from_numpy(scores).to(device=device, dtype=torch.float32)
        return scores
