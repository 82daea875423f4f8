"""What a training run feeds its model. `load_data` turns the dataset's records into this
process's training batches and its share of the validation images:

- `FeatureBatches`: with the encoder frozen (the default), image features come from the
  feature store (features.py), computed once; captions without images (--text-data) are
  mixed in, each with a concept vector drawn from its own words, or with a photo of what it
  names (--text-photos).
- `ImageBatches`: with --fine-tune-encoder, a DataLoader of augmented photos.
- `ScstBatches`: with --objective scst, stored features one row per photo, and the CIDEr-D
  scorer of their reference captions.

All are shaped like a DataLoader: `len()` is the steps of an epoch, `set_epoch(epoch)`
picks that epoch's shuffle and iterating yields (inputs, spatial maps or None, concepts or
None, tokens, images skipped); ScstBatches yields photo indices in place of tokens. The maps
(B, P, D) are there for an attention model on stored features (with the encoder in the loop
it makes them itself). Every process draws the
same shuffle (seed + epoch) and takes its share of each global batch (DistributedSampler,
padded so that all take the same number of steps, which DDP needs).
"""
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .chair import mentioned_objects
from .cider import CiderD
from .data import Record, read_dataset, read_text_captions
from .features import compute_features, encode_missing
from .images import ImageError, find_images, image_loader, load_image, train_transform
from .machine import DEFAULT_CACHE_DIR, decoding_workers
from .vocab import PAD_ID, UNK_ID

log = logging.getLogger(__name__)
MIN_VAL_IMAGES = 20  # fewer, and the validation CIDEr that picks checkpoints is mostly noise

# A text-only caption's concept vector is drawn to look like the classifier's output on a
# photo of the scene: each concept its words name gets p ~ U(NAMED_CONCEPT_LOW, 1) and is
# missed with probability NAMED_CONCEPT_MISS; a DISTRACTOR_SHARE of the captions also gets
# one random concept at p ~ U(0, DISTRACTOR_HIGH).
NAMED_CONCEPT_LOW = 0.3
NAMED_CONCEPT_MISS = 0.15
DISTRACTOR_SHARE = 0.5
DISTRACTOR_HIGH = 0.25
# A --text-photos photo stands for the concept its classifier gives at least this much.
SURE_PHOTO_CONCEPT = 0.5


def read_training_records(config):
    """The training and validation records and the text-only captions, refused up front
    when they cannot make a run. -> (train records, val records, text captions)."""
    records = read_dataset(config.data, config.format, config.images, val_fraction=config.val_fraction,
                           split_file=config.split_file)
    text_captions = [c for path in config.text_data for c in read_text_captions(path)]
    train_set = [r for r in records if r.split == "train"]
    val_set = [r for r in records if r.split == "val"]
    if not train_set:
        raise ValueError(f"{config.data}: no training images")
    if not val_set:
        raise ValueError(f"{config.data}: no validation images (need a val/dev split, or two or more images)")
    if len(val_set) < MIN_VAL_IMAGES:
        log.warning("only %d validation image(s): their CIDEr is too noisy to choose the best epoch or to stop "
                    "early on; give more (--val-fraction, or a val split with %d+ images)", len(val_set),
                    MIN_VAL_IMAGES)
    return train_set, val_set, text_captions


def tokenize_captions(records, vocab, max_length):
    """Every caption of `records` as token ids. -> (image index per caption, padded
    (N, max_length+2) token tensor)."""
    image_idx, rows = [], []
    for i, r in enumerate(records):
        for c in r.captions:
            ids = vocab.encode(c, max_length)
            if len(ids) > 2:  # a caption with no word is no training signal
                image_idx.append(i)
                rows.append(ids)
    tokens = torch.full((len(rows), max_length + 2), PAD_ID, dtype=torch.long)
    for j, ids in enumerate(rows):
        tokens[j, :len(ids)] = torch.tensor(ids)
    return torch.tensor(image_idx, dtype=torch.long), tokens


def text_concept_lists(concepts, tokens, vocab):
    """Per text-only caption (a row of token ids), the concepts its words name."""
    return [concepts.in_text([vocab.itos[i] for i in row if i > UNK_ID]) for row in tokens.tolist()]


def noisy_concepts(lists, num_concepts, generator=None):
    """Concept vectors (N, C) for text-only captions, drawn to look like the classifier's
    output on a photo of the scene (see NAMED_CONCEPT_LOW and the constants after it)."""
    n = len(lists)
    out = torch.zeros(n, num_concepts)
    rows = [i for i, cs in enumerate(lists) for _ in cs]
    cols = [c for cs in lists for c in cs]
    if rows:
        p = NAMED_CONCEPT_LOW + (1 - NAMED_CONCEPT_LOW) * torch.rand(len(rows), generator=generator)
        p = p * (torch.rand(len(rows), generator=generator) >= NAMED_CONCEPT_MISS)
        out[rows, cols] = p
    distract = (torch.rand(n, generator=generator) < DISTRACTOR_SHARE).nonzero().flatten()
    if len(distract):
        cols = torch.randint(num_concepts, (len(distract),), generator=generator)
        p = DISTRACTOR_HIGH * torch.rand(len(distract), generator=generator)
        out[distract, cols] = torch.maximum(out[distract, cols], p)
    return out


def epoch_sampler(n, seed, procs):
    """The same shuffle of range(n) in every process (seed + epoch, after set_epoch), each
    taking its share, padded so that all take the same number of steps."""
    return DistributedSampler(range(n), num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=seed)


class FeatureBatches:
    """Batches of stored image features. Each epoch holds every image-caption pair and a
    fresh draw of `text_sample` of the text-only captions (the same draw in every process),
    shuffled. A photo's row gets its feature and map (both hidden for a `feature_dropout`
    share) and the classifier's concepts; a text row gets a zero feature and map and
    noisy_concepts of its words. Yields (features, maps or None, concepts or None, tokens, 0)
    on the features' device."""

    def __init__(self, features, concepts, image_idx, tokens, text_tokens, text_concepts, config, procs,
                 text_photos=None, maps=None):
        """features, concepts: (images, D) and (images, C) or None, on the model's device;
        image_idx, tokens: each caption's image and tokens; text_tokens and text_concepts
        (concept lists): the text-only captions; text_photos: TextPhotos or None; maps:
        (images, P, D) float16 spatial maps, or None for a pooled model."""
        self.features, self.concepts, self.text_concepts, self.maps = features, concepts, text_concepts, maps
        self.text_photos = text_photos
        self.n_pairs, self.n_text = len(image_idx), len(text_tokens)  # rows from n_pairs on are text
        self.image_idx = torch.cat([image_idx, torch.full((self.n_text,), -1, dtype=torch.long)])
        self.tokens = torch.cat([tokens, text_tokens])
        self.n_drawn = round(self.n_text * config.text_sample)
        self.captions = self.n_pairs + self.n_drawn  # per epoch, all processes together
        self.batch_size, self.seed, self.feature_dropout = config.batch_size, config.seed, config.feature_dropout
        self.sampler = epoch_sampler(self.captions, config.seed, procs)
        self.epoch = 0

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        draw = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.randperm(self.n_text, generator=draw)[:self.n_drawn] + self.n_pairs
        rows = torch.cat([torch.arange(self.n_pairs), drawn])
        order = rows[torch.tensor(list(self.sampler), dtype=torch.long)]
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start:start + self.batch_size])

    def batch(self, rows):
        device = self.features.device
        idx = self.image_idx[rows]
        photo = idx >= 0
        keep = photo & (torch.rand(len(rows)) >= self.feature_dropout)  # photos whose feature is shown
        features = torch.zeros(len(rows), self.features.shape[1], device=device)
        features[keep.to(device)] = self.features[idx[keep].to(device)]
        maps = None
        if self.maps is not None:  # (B, P, D), float32 for the decoder
            maps = torch.zeros(len(rows), *self.maps.shape[1:], device=device)
            maps[keep.to(device)] = self.maps[idx[keep].to(device)].float()
        if self.concepts is None:
            return features, maps, None, self.tokens[rows], 0
        concepts = torch.zeros(len(rows), self.concepts.shape[1], device=device)
        concepts[photo.to(device)] = self.concepts[idx[photo].to(device)]
        text_rows = (~photo).nonzero().flatten()
        if len(text_rows):
            lists = [self.text_concepts[int(rows[r]) - self.n_pairs] for r in text_rows]
            concepts[text_rows.to(device)] = noisy_concepts(lists, self.concepts.shape[1]).to(device)
        if self.text_photos is not None and len(text_rows):
            self.text_photos.fill(features, maps, concepts, text_rows, rows[text_rows] - self.n_pairs,
                                  self.feature_dropout)
        return features, maps, concepts, self.tokens[rows], 0


class ScstBatches:
    """Batches of training photos for self-critical sequence training: one row per photo
    with a usable caption (not per caption), text-only captions left out (a sampled caption
    without a photo has no references to be scored against), every photo's feature shown.
    `cider` scores samples against the photo's reference captions, with document frequencies
    from all training references. Yields (features, maps or None, concepts or None, photo
    indices, 0) on the features' device; the indices are `cider`'s image ids."""

    def __init__(self, features, concepts, image_idx, tokens, config, procs, maps=None):
        """features, concepts: (images, D) and (images, C) or None; image_idx, tokens: each
        caption's image and tokens (tokenize_captions); maps: (images, P, D) or None."""
        self.features, self.concepts, self.maps = features, concepts, maps
        self.images = image_idx.unique()  # photos with a caption
        self.cider = CiderD(reference_ids(image_idx, tokens))
        self.captions = len(self.images)  # rows per epoch, all processes together
        self.batch_size = config.batch_size
        self.sampler = epoch_sampler(len(self.images), config.seed, procs)

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        order = self.images[torch.tensor(list(self.sampler), dtype=torch.long)]
        device = self.features.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            concepts = self.concepts[idx.to(device)] if self.concepts is not None else None
            maps = self.maps[idx.to(device)].float() if self.maps is not None else None
            yield self.features[idx.to(device)], maps, concepts, idx, 0


def reference_ids(image_idx, tokens):
    """{image index: [reference caption as token ids]}, each caption without <START> and
    with its <END> (SCST counts the end token as a word, so that ending where people end
    their captions is rewarded)."""
    references = {}
    for i, row, length in zip(image_idx.tolist(), tokens.tolist(), (tokens != PAD_ID).sum(1).tolist(), strict=True):
        references.setdefault(i, []).append(row[1:length])
    return references


class TextPhotos:
    """Photos for text-only captions (--text-photos): a caption that names the concept a
    photo shows, and no person, is trained with a random one of those photos' features and
    their classifier concepts, as a photo of the scene would give them."""

    def __init__(self, features, concepts, text_tokens, text_concepts, vocab, maps=None):
        """features, concepts: the photos' (N, D) and (N, C), maps their (N, P, D) or None;
        text_tokens, text_concepts: the text-only captions' tokens and concept lists."""
        self.features, self.concepts, self.maps = features, concepts, maps
        p, top = concepts.max(dim=1)
        by_concept = {}
        for i in (p >= SURE_PHOTO_CONCEPT).nonzero().flatten().tolist():
            by_concept.setdefault(int(top[i]), []).append(i)
        self.candidates = []  # per text caption, the photos it may go with
        for row, named in zip(text_tokens.tolist(), text_concepts, strict=True):
            words = " ".join(vocab.itos[i] for i in row if i > UNK_ID)
            people = "person" in mentioned_objects(words)  # a photo of an object shows nobody
            self.candidates.append([] if people else [i for c in named for i in by_concept.get(c, [])])
        self.paired = sum(1 for c in self.candidates if c)

    def fill(self, features, maps, concepts, batch_rows, text_index, feature_dropout):
        """Give the batch's text rows (`batch_rows`, their text captions `text_index`) a
        photo where they have one; its feature (and map) is hidden for a `feature_dropout` share."""
        for r, t in zip(batch_rows.tolist(), text_index.tolist(), strict=True):
            options = self.candidates[t]
            if not options:
                continue
            k = options[int(torch.randint(len(options), ()))]
            concepts[r] = self.concepts[k]
            if float(torch.rand(())) >= feature_dropout:
                features[r] = self.features[k]
                if maps is not None:
                    maps[r] = self.maps[k].float()


class PairsWithImages(Dataset):
    """(augmented pixels, caption tokens) pairs, for training with the encoder in the loop."""

    def __init__(self, paths, image_idx, tokens):
        self.paths, self.image_idx, self.tokens = paths, image_idx, tokens

    def __len__(self):
        return len(self.image_idx)

    def __getitem__(self, j):
        try:
            pixels = train_transform(load_image(self.paths[self.image_idx[j]]))
        except ImageError:
            return None  # dropped by the collate function; counted in the epoch log
        return pixels, self.tokens[j]


def _collate_pairs(items):
    good = [x for x in items if x is not None]
    if not good:
        return None, None, None, None, len(items)
    return torch.stack([p for p, _ in good]), None, None, torch.stack([t for _, t in good]), len(items) - len(good)


class ImageBatches:
    """Batches of augmented photos, for training with the encoder in the loop: a DataLoader
    over PairsWithImages. Yields (pixels, None, None, tokens, unreadable images skipped); a
    batch with no readable image is (None, None, None, None, skipped)."""

    def __init__(self, paths, image_idx, tokens, config, procs, device):
        pairs = PairsWithImages(paths, image_idx.tolist(), tokens)
        self.captions = len(pairs)  # per epoch, all processes together
        self.sampler = epoch_sampler(len(pairs), config.seed, procs)
        # The same worker policy as every image loader: the other cores train.
        workers = decoding_workers() if config.workers is None else config.workers
        self.loader = DataLoader(pairs, batch_size=config.batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=_collate_pairs, pin_memory=device.type == "cuda")

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)


@dataclass
class Validation:
    """This process's share of the validation images, and the reference captions of all of
    them (every process scores all captions). With the encoder frozen their stored features
    are kept on the model's device; with the encoder training they are encoded afresh."""
    records: list  # this process's share
    references: dict  # {image path: reference captions} of every validation image
    features: torch.Tensor | None = None  # the records' stored features, or None to encode them
    workers: int | None = None  # image-decoding workers when encoding
    maps: torch.Tensor | None = None  # their stored spatial maps, for an attention model

    def encoded(self, model, device):
        """-> (features and maps (None for a pooled model) on `device` from `model` as it is
        now, the records they belong to)."""
        if self.features is not None:
            return self.features, self.maps, self.records
        return encode_records(model, self.records, device, self.workers)


def encode_records(model, records, device, num_workers):
    """Features and maps of the records' images with the current (fine-tuned) encoder.
    -> (features, maps or None for a pooled model, the records whose image could be read)."""
    feats, maps, kept = [], [], []
    model.eval()
    with torch.inference_mode():
        for idx, pixels, _ in image_loader([r.image for r in records], num_workers=num_workers,
                                           pin_memory=device.type == "cuda"):
            if pixels is not None:
                pooled, spatial = model.encode_images(pixels.to(device))
                feats.append(pooled)
                maps.append(spatial)
                kept.extend(records[i] for i in idx)
    if not kept and records:
        raise ValueError("no readable validation images")
    if not kept:
        return torch.zeros(0, model.config.feature_dim, device=device), None, kept
    return torch.cat(feats), torch.cat(maps) if model.config.attention else None, kept


def load_data(config, model, vocab, train_set, val_set, text_captions, device, procs):
    """This process's training batches and validation images on `device`.
    -> (FeatureBatches or, with --fine-tune-encoder, ImageBatches; Validation)."""
    image_idx, tokens = tokenize_captions(train_set, vocab, config.max_caption_length)
    paths = [r.image for r in train_set]
    if config.fine_tune_encoder:
        validation = Validation(procs.share(val_set), {str(r.image): r.captions for r in val_set},
                                workers=config.workers)
        return ImageBatches(paths, image_idx, tokens, config, procs, device), validation

    features, maps, ok = stored_features(config, model, paths + [r.image for r in val_set], device, procs)
    train_ok, val_ok = ok[:len(paths)], ok[len(paths):]
    keep = torch.tensor(train_ok)[image_idx]  # captions of unreadable images go
    image_idx, tokens = image_idx[keep], tokens[keep]
    if len(image_idx) == 0:
        raise ValueError(f"{config.data}: no usable training captions")
    val_set = [r for r, good in zip(val_set, val_ok, strict=True) if good]
    val_features = features[len(paths):][torch.tensor(val_ok)]
    val_maps = procs.share(maps[len(paths):][torch.tensor(val_ok)]).to(device) if maps is not None else None
    validation = Validation(procs.share(val_set), {str(r.image): r.captions for r in val_set},
                            features=procs.share(val_features).to(device), maps=val_maps)  # decoded on its device

    train_features = features[:len(paths)].to(device)
    train_maps = maps[:len(paths)].to(device) if maps is not None else None  # float16 until batched
    with torch.inference_mode():
        train_concepts = model.decoder_concepts(model.classify_features(train_features))
    if config.objective == "scst":
        return ScstBatches(train_features, train_concepts, image_idx, tokens, config, procs, train_maps), validation
    text_tokens = tokenize_captions([Record(Path(), text_captions)], vocab, config.max_caption_length)[1] \
        if text_captions else torch.empty(0, config.max_caption_length + 2, dtype=torch.long)
    text_concepts = text_concept_lists(model.concepts, text_tokens, vocab) if model.config.num_concepts else []
    text_photos = load_text_photos(config, model, text_tokens, text_concepts, vocab, device, procs) \
        if config.text_photos and text_concepts else None
    batches = FeatureBatches(train_features, train_concepts, image_idx, tokens, text_tokens, text_concepts, config,
                             procs, text_photos, train_maps)
    return batches, validation


def load_text_photos(config, model, text_tokens, text_concepts, vocab, device, procs):
    """The --text-photos folder's features (from the feature store) as TextPhotos."""
    paths = find_images([Path(config.text_photos)], recursive=True)
    features, maps, ok = stored_features(config, model, paths, device, procs)
    ok = torch.tensor(ok, dtype=torch.bool)
    features, maps = features[ok], maps[ok] if maps is not None else None
    with torch.inference_mode():
        concepts = model.decoder_concepts(model.classify_features(features))
    photos = TextPhotos(features, concepts, text_tokens, text_concepts, vocab, maps)
    if procs.main:
        log.info("--text-photos: %d of %d text-only captions go with one of %d photos", photos.paired,
                 len(text_concepts), len(features))
    return photos


def stored_features(config, model, paths, device, procs):
    """The images' features from the feature store, encoding what it lacks (under torchrun
    each process encodes its share, then every one reads all). -> (features, maps (float16)
    or None for a pooled model, readable)."""
    cache_dir = config.cache_dir or DEFAULT_CACHE_DIR
    spatial = model.config.attention
    if procs.world > 1:
        encode_missing(model, paths, device, cache_dir, num_workers=config.workers, backend=config.backend,
                       part=(procs.rank, procs.world), spatial=spatial)
        procs.barrier()
    found = compute_features(model, paths, device, cache_dir, num_workers=config.workers, backend=config.backend,
                             spatial=spatial)
    return found[0], found[1] if spatial else None, found[-1]
