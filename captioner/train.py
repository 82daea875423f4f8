"""Training: `captioner train`. Shaped like torchvision's reference scripts: a
train_one_epoch, an evaluate, and a main loop that checkpoints, resumes and logs.

Recipe: teacher forcing with cross-entropy that ignores padding (with label smoothing),
Adam, gradient-norm clipping, cosine learning-rate decay, and early stopping on the
validation CIDEr of beam-decoded captions. With the encoder frozen (the default), image
features are computed once and cached on disk, so an epoch on a CPU is a decoder-only
pass; --fine-tune-encoder runs images through the encoder at every step instead.

Open-world captions (`--text-data`): captions without images (COCO's caption text) are
trained alongside the image-caption pairs, so the decoder learns words and sentences that
no training photo shows. A text-only caption has no image feature (zeros; the decoder's
LayerNorm turns that into a learned "no photo" start) and gets a concept vector from its
own words, noised to look like a classifier's output; a photo gets the concept vector of
the encoder's classifier. Dropping some photos' features (`--feature-dropout`) teaches the
decoder to lean on the concepts when the feature says little (a kitchen to a Flickr8k model).
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .backends import DEFAULT_BACKEND, DEFAULT_CACHE_DIR, load_backend, resolve_backend
from .checkpoint import read_checkpoint, save_checkpoint
from .concepts import ConceptMap, shipped_concepts
from .data import Record, read_dataset, read_text_captions
from .encoder import ENCODER_NAME
from .images import ImageError, image_loader, load_image, train_transform
from .inference import decode_features, resolve_device
from .metrics import score_captions
from .model import CaptionModel, ModelConfig
from .options import DecodeOptions
from .vocab import PAD_ID, SPECIAL_TOKENS, UNK_ID, Vocabulary

log = logging.getLogger(__name__)
# Bump when the encoder or `preprocess` changes, so stale cached features are not reused.
# Settings a started run keeps: --resume refuses a different value, naming it. The others
# (epochs, patience, workers, device, amp, cache folder) may change and are recorded.
FIXED_ON_RESUME = ("data", "format", "images", "split_file", "batch_size", "lr", "lr_decay_epochs", "encoder_lr",
                   "embed_dim", "hidden_dim", "num_layers", "cell", "dropout", "label_smoothing", "min_word_count",
                   "max_caption_length", "beam_size", "text_data", "text_sample", "concepts", "feature_dropout",
                   "decode", "select_metric", "clip_grad", "val_fraction", "seed", "fine_tune_encoder",
                   "init_from", "backend")
SAMPLE_CAPTIONS = 5  # validation captions kept in each metrics.jsonl row, to read how the model talks
MIN_VAL_IMAGES = 20  # fewer, and the validation CIDEr that picks checkpoints is mostly noise
FEATURE_CACHE_VERSION = f"{ENCODER_NAME}-squash224-v2"  # v2: JPEGs drafted to 224, not 448


# ---------------------------------------------------------------- image features

def _cache_key(path, backend="torch"):
    stat = Path(path).stat()
    raw = f"{FEATURE_CACHE_VERSION}|{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if backend != "torch":  # torch fp32 keeps the keys it always had
        raw += f"|{backend}"
    return hashlib.sha1(raw.encode()).hexdigest()


@torch.inference_mode()
def compute_features(model, paths, device, cache_dir=DEFAULT_CACHE_DIR, batch_size=64, num_workers=None,
                     backend=DEFAULT_BACKEND):
    """Pooled encoder features for `paths`, computed once with the encoder `backend` and
    cached on disk, keyed by image file (path, size, mtime), encoder version and backend.
    -> (features (N, D) float32 with zeros where the image failed, list of bool ok)."""
    cache_file = Path(cache_dir) / f"features-{FEATURE_CACHE_VERSION}.safetensors"
    cache = load_file(str(cache_file)) if cache_file.is_file() else {}
    name = resolve_backend(backend, device)
    keys = [_cache_key(p, name) for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    failed = {}
    if todo:  # the encoder (an ONNX session, say) is only made when something needs encoding
        encode = load_backend(model.encoder, backend, device, cache_dir)
        log.info("encoding %d images with %s (%d already cached in %s)", len(todo), encode.name,
                 len(paths) - len(todo), cache_file)
        loader = image_loader([paths[i] for i in todo], batch_size=batch_size, num_workers=num_workers)
        since_save = 0
        bar = tqdm(total=len(todo), desc="encoding images", unit="img")
        for idx, pixels, errors in loader:
            for j, err in errors.items():
                failed[todo[j]] = err
            if pixels is not None:
                feats = encode(pixels).float().cpu()
                for j, f in zip(idx, feats, strict=True):
                    cache[keys[todo[j]]] = f.clone()
                since_save += len(idx)
            bar.update(len(idx) + len(errors))
            if since_save >= 2000:  # an interrupted run keeps what it computed
                _save_cache(cache, cache_file)
                since_save = 0
        bar.close()
        _save_cache(cache, cache_file)
    if failed:
        example = next(iter(failed.items()))
        log.warning("skipped %d unreadable images (e.g. %s: %s)", len(failed), paths[example[0]], example[1])
    dim = model.config.feature_dim
    features = torch.stack([cache.get(k, torch.zeros(dim)) for k in keys])
    return features, [k in cache for k in keys]


def _save_cache(cache, cache_file):
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    save_file(cache, str(tmp))
    tmp.replace(cache_file)


# ---------------------------------------------------------------- batches

def encode_captions(records, vocab, max_length):
    """-> (image index per caption, padded (N, max_length+2) token tensor)."""
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
    output on a photo of the scene: a named concept gets p ~ U(0.3, 1) and is missed 15%
    of the time; half the rows get a distractor at p ~ U(0, 0.25)."""
    n = len(lists)
    out = torch.zeros(n, num_concepts)
    rows = [i for i, cs in enumerate(lists) for _ in cs]
    cols = [c for cs in lists for c in cs]
    if rows:
        p = 0.3 + 0.7 * torch.rand(len(rows), generator=generator)
        p = p * (torch.rand(len(rows), generator=generator) >= 0.15)
        out[rows, cols] = p
    distract = (torch.rand(n, generator=generator) < 0.5).nonzero().flatten()
    if len(distract):
        cols = torch.randint(num_concepts, (len(distract),), generator=generator)
        out[distract, cols] = torch.maximum(out[distract, cols], 0.25 * torch.rand(len(distract), generator=generator))
    return out


def caption_loss(logits, targets, label_smoothing=0.0):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=PAD_ID, label_smoothing=label_smoothing)


class PairsWithImages(torch.utils.data.Dataset):
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
        return None, None, None, len(items)
    return torch.stack([p for p, _ in good]), None, torch.stack([t for _, t in good]), len(items) - len(good)


# ---------------------------------------------------------------- one epoch, evaluation

def amp_dtype(device, amp=True):
    """The autocast type for training on `device`, or None for fp32: bf16 where the GPU
    computes it natively (compute capability 8.0+: A100, H100, RTX 30xx and later), fp16 with
    loss scaling elsewhere (T4, V100: torch.cuda.is_bf16_supported() says yes there too, but
    emulates it, slowly). No autocast on the CPU."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def _autocast(device, amp):
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(model, optimizer, batches, device, clip_grad, label_smoothing, amp, scaler, desc, steps=None):
    model.train()
    if not model.encoder_tuned:
        model.encoder.eval()
    else:
        # Small batches make BatchNorm statistics noisy: keep the pretrained ones.
        for m in model.encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    total, count, skipped, images = 0.0, 0, 0, 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, total=steps)
    for inputs, concepts, tokens, n_skipped in bar:
        skipped += n_skipped
        if inputs is None:
            continue
        inputs, tokens = inputs.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        length = int((tokens != PAD_ID).sum(1).max())
        tokens = tokens[:, :length]
        with _autocast(device, amp):
            features = model.encode_images(inputs) if model.encoder_tuned else inputs
            if concepts is None:  # photos in the loop: the classifier's view, not trained through
                with torch.no_grad():
                    concepts = model.decoder_concepts(model.classify_features(features.detach()))
            else:
                concepts = concepts.to(device, non_blocking=True)
            logits = model.decoder(features, tokens[:, :-1], concepts)
            loss = caption_loss(logits.float(), tokens[:, 1:], label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(tokens)
        count += len(tokens)
        images += len(tokens)
        bar.set_postfix(loss=f"{total / count:.3f}")
    return total / max(count, 1), images, skipped


@torch.inference_mode()
def evaluate_features(model, vocab, features, records, options, use_java=False, batch_size=250):
    """Decode every image of `records` from its features as users get it (`options`, a
    DecodeOptions: grounding included) and score against all its references.
    -> (scores dict, {image path: caption})."""
    model.eval()
    predictions = {}
    for start in range(0, len(records), batch_size):
        chunk = features[start:start + batch_size]
        for r, result in zip(records[start:start + batch_size],
                             decode_features(model, vocab, chunk, options), strict=True):
            predictions[str(r.image)] = result["caption"]
    references = {str(r.image): r.captions for r in records}
    return score_captions(predictions, references, use_java=use_java, cider_only=not use_java), predictions


@torch.inference_mode()
def validation_loss(model, vocab, features, records, max_length, label_smoothing, batch_size=250):
    """Teacher-forced loss on the validation images' reference captions (the training loss's
    twin: a gap between them that grows means over-fitting)."""
    model.eval()
    index, tokens = encode_captions(records, vocab, max_length)
    device = features.device
    total, count = 0.0, 0
    for s in range(0, len(tokens), batch_size):
        feats = features[index[s:s + batch_size].to(device)]
        toks = tokens[s:s + batch_size].to(device)
        toks = toks[:, :int((toks != PAD_ID).sum(1).max())]
        concepts = model.decoder_concepts(model.classify_features(feats))
        logits = model.decoder(feats, toks[:, :-1], concepts)
        total += caption_loss(logits.float(), toks[:, 1:], label_smoothing).item() * len(toks)
        count += len(toks)
    return total / max(1, count)


# ---------------------------------------------------------------- main loop

def train(data, out, format="auto", images=None, epochs=30, batch_size=64, lr=4e-4, encoder_lr=1e-5,
          embed_dim=512, hidden_dim=512, num_layers=1, cell="lstm", dropout=0.5, min_word_count=5,
          max_caption_length=20, beam_size=3, seed=0, device="auto", fine_tune_encoder=False,
          resume=False, patience=5, clip_grad=5.0, label_smoothing=0.1, num_workers=None,
          cache_dir=DEFAULT_CACHE_DIR, amp=True, val_fraction=0.1, select_metric="CIDEr", lr_decay_epochs=None,
          text_data=(), text_sample=1.0, concepts=True, feature_dropout=0.0, decode=None, init_from=None,
          backend=DEFAULT_BACKEND, split_file=None):
    """Train a captioner on `data` (plus the caption-only files `text_data`) and write
    best.safetensors, last.safetensors, train_state.pt, metrics.jsonl and curves.png to
    `out`; each epoch draws the share `text_sample` of the text-only captions. `concepts`
    gives the decoder the classifier's concept vector; `decode` (a
    DecodeOptions) is how validation captions are decoded, the users' default if None.
    `init_from` (a checkpoint) starts from trained weights: its architecture, concept map
    and vocabulary, extended with this data's new words. `backend` encodes the images for the
    feature cache (backends.BACKENDS). Returns a summary dict."""
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    args["text_data"] = [str(p) for p in text_data]
    args["decode"] = decode.to_dict() if decode else None
    args["init_from"] = str(init_from) if init_from else None
    args["split_file"] = str(split_file) if split_file else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    state_file = out / "train_state.pt"
    if resume and not state_file.is_file():
        raise FileNotFoundError(f"--resume: no {state_file} to resume from")
    if not resume and state_file.is_file():  # never overwrite an earlier run's checkpoints
        raise ValueError(f"{out} already holds a training run; use --resume to continue it, or another --out")
    state = torch.load(state_file, map_location="cpu", weights_only=True) if resume else None
    if state and "settings" in state:
        stored = json.loads(state["settings"])
        changed = [k for k in FIXED_ON_RESUME if k in stored and stored[k] != args[k]]
        if changed:
            raise ValueError("--resume: " + "; ".join(f"--{k.replace('_', '-')} was {stored[k]!r}, now {args[k]!r}"
                                                       for k in changed)
                             + ". A started run keeps these; start a new run (another --out) to change them")
    random.seed(seed)
    torch.manual_seed(seed)

    decode = (decode or DecodeOptions()).replace(beam_size=beam_size, n_best=1, max_length=max_caption_length)
    if text_data and fine_tune_encoder:
        raise ValueError("--text-data trains with cached features; it cannot be combined with --fine-tune-encoder")
    records = read_dataset(data, format, images, val_fraction=val_fraction, split_file=split_file)
    text_captions = [c for path in text_data for c in read_text_captions(path)]
    train_set = [r for r in records if r.split == "train"]
    val_set = [r for r in records if r.split == "val"]
    if not train_set:
        raise ValueError(f"{data}: no training images")
    if not val_set:
        raise ValueError(f"{data}: no validation images (need a val/dev split, or two or more images)")
    if len(val_set) < MIN_VAL_IMAGES:
        log.warning("only %d validation image(s): their CIDEr is too noisy to choose the best epoch or to stop "
                    "early on; give more (--val-fraction, or a val split with %d+ images)", len(val_set),
                    MIN_VAL_IMAGES)
    init = None if state or not init_from else read_checkpoint(init_from)
    if state:
        vocab = Vocabulary.from_json(state["vocab"])
    else:
        vocab = Vocabulary.build([c for r in train_set for c in r.captions] + text_captions, min_word_count)
        if init:  # the trained words keep their ids; this data's new words are appended
            vocab = Vocabulary(init[1].itos + [w for w in vocab.itos[4:] if w not in init[1].stoi])
    log.info("%d train and %d val images, %d text-only captions, vocabulary of %d words",
             len(train_set), len(val_set), len(text_captions), len(vocab))
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise ValueError(f"{data}: no word appears at least --min-word-count ({min_word_count}) times in the "
                         f"training captions, so the vocabulary would be empty; lower --min-word-count or add captions")
    if state:
        concept_map = ConceptMap.from_json(state["concepts"]) if "concepts" in state else shipped_concepts()
        config = ModelConfig(**json.loads(state["model_config"]))
    elif init:
        concept_map, config = init[2], dataclasses.replace(init[0], vocab_size=len(vocab))
    else:
        concept_map = shipped_concepts()
        config = ModelConfig(vocab_size=len(vocab), embed_dim=embed_dim, hidden_dim=hidden_dim,
                             num_layers=num_layers, cell=cell, dropout=dropout,
                             num_concepts=len(concept_map) if concepts else 0)
    model = CaptionModel(config, concepts=concept_map).to(device)
    if init:
        warm_start(model, init[3], fine_tune_encoder, init_from)
        log.info("warm start from %s (%d words kept, %d new)", init_from, len(init[1]), len(vocab) - len(init[1]))
    model.encoder_tuned = fine_tune_encoder
    model.encoder.requires_grad_(fine_tune_encoder)

    train_idx, train_tokens = encode_captions(train_set, vocab, max_caption_length)
    train_paths = [r.image for r in train_set]
    n_text = n_text_drawn = 0  # text-only captions, and those drawn for each epoch
    if fine_tune_encoder:
        pairs = PairsWithImages(train_paths, train_idx.tolist(), train_tokens)
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        make_batches = lambda: torch.utils.data.DataLoader(  # noqa: E731
            pairs, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=_collate_pairs,
            pin_memory=device.type == "cuda", drop_last=False)
        val_features_fn = lambda: encode_records(model, val_set, device, num_workers)  # noqa: E731
    else:
        train_features, ok = compute_features(model, train_paths, device, cache_dir, num_workers=num_workers,
                                              backend=backend)
        keep = torch.tensor(ok)[train_idx]
        train_idx, train_tokens = train_idx[keep], train_tokens[keep]
        val_features, val_ok = compute_features(model, [r.image for r in val_set], device, cache_dir,
                                                num_workers=num_workers, backend=backend)
        val_set = [r for r, good in zip(val_set, val_ok, strict=True) if good]
        val_features = val_features[torch.tensor(val_ok)].to(device)  # decoded by the model, on its device
        train_features = train_features.to(device)
        with torch.inference_mode():
            train_concepts = model.decoder_concepts(model.classify_features(train_features))
        # Text-only captions join the pairs with image index -1: no feature, concepts from their words.
        text_tokens = encode_captions([Record(Path(), text_captions)], vocab, max_caption_length)[1] \
            if text_captions else torch.empty(0, max_caption_length + 2, dtype=torch.long)
        text_concepts = text_concept_lists(concept_map, text_tokens, vocab) if config.num_concepts else []
        train_idx = torch.cat([train_idx, torch.full((len(text_tokens),), -1, dtype=torch.long)])
        train_tokens = torch.cat([train_tokens, text_tokens])

        n_text = len(text_tokens)
        n_text_drawn = round(n_text * text_sample)
        n_pairs = len(train_idx) - n_text  # rows before n_pairs are photo captions, the rest text

        def make_batches():
            # Every pair, and a fresh draw of `text_sample` of the text-only captions, shuffled.
            drawn = torch.randperm(n_text)[:n_text_drawn] + n_pairs
            rows = torch.cat([torch.arange(n_pairs), drawn])
            order = rows[torch.randperm(len(rows))]
            for s in range(0, len(order), batch_size):
                j = order[s:s + batch_size]
                idx = train_idx[j]
                photo = idx >= 0
                # (b, feature_dim): a photo's feature, zeros for text, some photos' dropped
                keep = photo & (torch.rand(len(j)) >= feature_dropout)
                feats = torch.zeros(len(j), config.feature_dim, device=device)
                feats[keep.to(device)] = train_features[idx[keep].to(device)]
                conc = None
                if config.num_concepts:
                    conc = torch.zeros(len(j), config.num_concepts, device=device)
                    conc[photo.to(device)] = train_concepts[idx[photo].to(device)]
                    text_rows = (~photo).nonzero().flatten()
                    if len(text_rows):
                        conc[text_rows.to(device)] = noisy_concepts(
                            [text_concepts[int(j[r]) - n_pairs] for r in text_rows], config.num_concepts).to(device)
                yield feats, conc, train_tokens[j], 0
        val_features_fn = lambda: (val_features, val_set)  # noqa: E731
    if len(train_idx) == 0:
        raise ValueError(f"{data}: no usable training captions")
    epoch_rows = len(train_idx) - n_text + n_text_drawn  # captions per epoch

    decoder_params = list(model.decoder.parameters())
    groups = [{"params": decoder_params, "lr": lr}]
    if fine_tune_encoder:
        groups.append({"params": list(model.encoder.parameters()), "lr": encoder_lr})
    optimizer = torch.optim.Adam(groups)
    # Cosine decay over lr_decay_epochs (default: this run's --epochs), kept in the
    # training state, so that a resumed run follows the schedule it started with; set it
    # explicitly to extend a finished run with --resume --epochs N as if it had been planned.
    base_lrs = [g["lr"] for g in groups]
    lr_decay_epochs = lr_decay_epochs or epochs
    # bf16 autocast needs no loss scaling; the scaler is a no-op unless fp16 is used.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)
    start_epoch, best, bad_epochs = 0, -math.inf, 0
    # Seed again: encoding images (DataLoaders draw seeds) must not change the training
    # order, or a run with a warm feature cache would differ from one with a cold cache.
    torch.manual_seed(seed)
    if state:
        model.decoder.load_state_dict(state["decoder"])
        if fine_tune_encoder and "encoder" in state:
            model.encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # fp16 loss scale: resumed, not re-learnt from 65536
            scaler.load_state_dict(state["scaler"])
        base_lrs, lr_decay_epochs = state["base_lrs"], state["lr_decay_epochs"]  # the schedule it started with
        if torch.cuda.is_available() and "cuda_rng" in state:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start_epoch, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_tuple_state(state["python_rng"]))
        log.info("resumed from %s at epoch %d (best %s %.4f)", state_file, start_epoch + 1, select_metric, best)

    info = {"name": out.name, "data": str(data), "train_images": len(train_set),
            "text_captions": len(text_captions), "train_args": args}
    metrics_file = out / "metrics.jsonl"
    if not resume and metrics_file.exists():
        metrics_file.unlink()
    elif resume and metrics_file.exists():  # drop rows of an epoch that stopped before its state was saved
        rows = [line for line in metrics_file.read_text().splitlines() if line.strip()]
        metrics_file.write_text("".join(r + "\n" for r in rows if json.loads(r)["epoch"] <= start_epoch))
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * lr_factor(epoch, lr_decay_epochs)
        loss, n_captions, skipped = train_one_epoch(
            model, optimizer, make_batches(), device, clip_grad, label_smoothing, amp, scaler,
            desc=f"epoch {epoch + 1}/{epochs}", steps=math.ceil(epoch_rows / batch_size))
        train_time = time.time() - t0
        val_features, val_records = val_features_fn()
        scores, predictions = evaluate_features(model, vocab, val_features, val_records, decode)
        val_loss = validation_loss(model, vocab, val_features, val_records, max_caption_length, label_smoothing)
        distinct = len(set(predictions.values())) / max(1, len(predictions))
        if len(predictions) >= 10 and distinct < 0.3:
            log.warning("epoch %d: only %d distinct captions for %d validation images: the model may be "
                        "collapsing to a few generic captions", epoch + 1, len(set(predictions.values())),
                        len(predictions))
        current_lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch + 1, "train_loss": round(loss, 4), "val_loss": round(val_loss, 4), "lr": current_lr,
               "captions": n_captions, "train_time_s": round(train_time, 1),
               "captions_per_s": round(n_captions / train_time, 1),
               "epoch_time_s": round(time.time() - t0, 1), "skipped_images": skipped,
               **{f"val_{k}": round(v, 4) for k, v in scores.items() if k != "tokenizer"},
               "val_distinct_captions": round(distinct, 4),
               "samples": {Path(k).name: v for k, v in list(predictions.items())[:SAMPLE_CAPTIONS]}}
        with open(metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        score = scores[select_metric]
        improved = score > best
        if improved:
            best, bad_epochs = score, 0
            save_checkpoint(out / "best.safetensors", model, vocab,
                            {**info, "epoch": epoch + 1, f"val_{select_metric}": round(score, 4)})
        else:
            bad_epochs += 1
        save_checkpoint(out / "last.safetensors", model, vocab, {**info, "epoch": epoch + 1})
        save_state({
            "decoder": model.decoder.state_dict(), "scaler": scaler.state_dict(),
            "settings": json.dumps({k: v for k, v in args.items() if k not in ("out", "resume")}),
            **({"encoder": model.encoder.state_dict()} if fine_tune_encoder else {}),
            "optimizer": optimizer.state_dict(), "base_lrs": base_lrs, "lr_decay_epochs": lr_decay_epochs,
            **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
            "epoch": epoch, "best": best, "bad_epochs": bad_epochs,
            "torch_rng": torch.get_rng_state(), "python_rng": list(_list_state(random.getstate())),
            "vocab": vocab.to_json(), "model_config": json.dumps(config.to_dict()),
            "concepts": concept_map.to_json(),
        }, state_file)
        log.info("epoch %d: loss %.3f, val %s %.4f, BLEU-4 %.4f%s (%.0fs)", epoch + 1, loss, select_metric,
                 score, scores["BLEU-4"], " *best*" if improved else "", row["epoch_time_s"])
        plot_curves(metrics_file, out / "curves.png", select_metric)
        if bad_epochs >= patience:
            log.info("no improvement for %d epochs: stopping early", patience)
            break
    return {"best": best, "metric": select_metric, "out": str(out)}


def encode_records(model, records, device, num_workers):
    """Features of the records' images with the current (fine-tuned) encoder.
    -> (features, the records whose image could be read)."""
    feats, kept = [], []
    model.eval()
    with torch.inference_mode():
        for idx, pixels, _ in image_loader([r.image for r in records], num_workers=num_workers):
            if pixels is not None:
                feats.append(model.encode_images(pixels.to(device)))
                kept.extend(records[i] for i in idx)
    if not kept:
        raise ValueError("no readable validation images")
    return torch.cat(feats), kept


def warm_start(model, tensors, fine_tune_encoder, source):
    """Copy a checkpoint's weights (`tensors`, as read_checkpoint gives them) into `model`,
    whose vocabulary may be longer: the rows of words the checkpoint knows are copied and
    the new words' rows keep their fresh initialisation."""
    encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    if encoder and not fine_tune_encoder:
        # Cached features come from the packaged encoder; a tuned one must run in the loop.
        raise ValueError(f"{source} has a fine-tuned encoder; warm-starting from it needs --fine-tune-encoder")
    if encoder:
        model.encoder.load_state_dict(encoder)
    own = model.decoder.state_dict()
    for key, old in tensors.items():
        if not key.startswith("decoder."):
            continue
        new = own[key[len("decoder."):]]
        if old.shape != new.shape and (old.shape[1:] != new.shape[1:] or old.shape[0] > new.shape[0]):
            raise ValueError(f"{source}: {key} has shape {tuple(old.shape)}, the model {tuple(new.shape)}")
        new[:old.shape[0]] = old  # the vocabulary rows (embed, out) grow; all else is equal
    model.decoder.load_state_dict(own)


def stored_settings(out):
    """The settings a run in `out` was started with (its train_state.pt), or None."""
    state_file = Path(out) / "train_state.pt"
    if not state_file.is_file():
        return None
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    return json.loads(state["settings"]) if "settings" in state else None


def save_state(state, path):
    """torch.save, atomically (a crash mid-write leaves the previous state), readable by others."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def lr_factor(epoch, decay_epochs):
    """Learning-rate multiplier of 0-based `epoch`: cosine from 1 down to 0.05 over
    `decay_epochs` epochs, then flat at 0.05."""
    t = min(epoch, decay_epochs) / max(decay_epochs, 1)
    return 0.05 + 0.95 * (1 + math.cos(math.pi * t)) / 2


def _list_state(s):  # random.getstate() nests tuples; keep it to lists/ints for weights_only
    return [list(x) if isinstance(x, tuple) else x for x in s]


def _tuple_state(s):
    return tuple(tuple(x) if isinstance(x, list) else x for x in s)


def plot_curves(metrics_file, png, select_metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_file)]
    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train")
    a.plot(epochs, [r.get("val_loss") for r in rows], marker="o", label="validation")
    a.set(title="loss (teacher-forced)", xlabel="epoch")
    a.legend()
    for key in (f"val_{select_metric}", "val_BLEU-4"):
        b.plot(epochs, [r.get(key) for r in rows], marker="o", label=key[4:])
    best = max(rows, key=lambda r: r.get(f"val_{select_metric}") or 0)["epoch"]
    b.axvline(best, color="grey", linestyle="--", label=f"best (epoch {best})")
    b.set(title="validation (beam-decoded)", xlabel="epoch")
    b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
