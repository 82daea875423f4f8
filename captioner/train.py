"""Training: `captioner train`. Shaped like torchvision's reference scripts: `load_data`,
`train_one_epoch`, `evaluate`, run-state save and load, and a short main loop (`train`)
that checkpoints, resumes and logs. Every setting and its default lives in
`options.TrainConfig`.

Recipe: teacher forcing with cross-entropy that ignores padding (with label smoothing),
Adam, gradient-norm clipping, cosine learning-rate decay, and early stopping on the
validation CIDEr of beam-decoded captions. With the encoder frozen (the default), image
features are computed once and kept in the feature store (features.py), so an epoch on a
CPU is a decoder-only pass; --fine-tune-encoder runs images through the encoder at every
step instead.

Several processes (`torchrun --nproc_per_node N -m captioner train ...`): one per GPU (or
CPU processes with gloo), DistributedDataParallel over the trained weights, each process
taking its share of every global batch (DistributedSampler) and of the images to encode
and to decode for validation; process 0 writes checkpoints, logs and metrics, and every
process resumes from the same train_state.pt.

Open-world captions (`--text-data`): captions without images (COCO's caption text) are
trained alongside the image-caption pairs, so the decoder learns words and sentences that
no training photo shows. A text-only caption has no image feature (zeros; the decoder's
LayerNorm turns that into a learned "no photo" start) and gets a concept vector from its
own words, noised to look like a classifier's output; a photo gets the concept vector of
the encoder's classifier. Dropping some photos' features (`--feature-dropout`) teaches the
decoder to lean on the concepts when the feature says little (a kitchen to a Flickr8k model).
"""
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .backends import DEFAULT_CACHE_DIR
from .checkpoint import read_checkpoint, save_checkpoint
from .concepts import ConceptMap, shipped_concepts
from .data import Record, read_dataset, read_text_captions
from .features import compute_features, encode_missing
from .images import ImageError, image_loader, load_image, train_transform
from .inference import DEFAULT_WEIGHTS, decode_features, resolve_device
from .metrics import score_captions
from .model import CaptionModel, ModelConfig
from .options import TrainConfig
from .vocab import PAD_ID, SPECIAL_TOKENS, UNK_ID, Vocabulary

log = logging.getLogger(__name__)
SAMPLE_CAPTIONS = 5  # validation captions kept in each metrics.jsonl row, to read how the model talks
MIN_VAL_IMAGES = 20  # fewer, and the validation CIDEr that picks checkpoints is mostly noise


# ---------------------------------------------------------------- processes

@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes: one, or torchrun's N."""
    rank: int = 0
    world: int = 1

    @property
    def main(self):  # the process that writes files and logs
        return self.rank == 0

    def share(self, items):
        """This process's share of `items` (every world-th, from its rank)."""
        return items[self.rank::self.world]

    def gather(self, obj):
        """[obj of every process], in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def init_processes(device_name):
    """-> (Processes, device). Under torchrun (WORLD_SIZE > 1) this joins the process group:
    NCCL with one GPU per process (cuda:LOCAL_RANK), or gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = resolve_device(device_name)
        if device.type == "cuda" and torch.cuda.device_count() > 1:
            log.info("%d GPUs found; this run uses %s only. To train on all of them, run the same command as "
                     "`torchrun --nproc_per_node %d -m captioner train ...`", torch.cuda.device_count(), device,
                     torch.cuda.device_count())
        return Processes(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available()):
        device, backend = torch.device("cpu"), "gloo"
    else:
        resolve_device("cuda")  # a clear error where there is no GPU
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Processes(dist.get_rank(), dist.get_world_size()), device


# ---------------------------------------------------------------- data

def read_records(config):
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


@dataclass
class TrainData:
    """What an epoch trains and validates on. `batches(epoch)` yields this process's
    (inputs, concepts or None, tokens, images skipped) batches; `validation()` gives this
    process's share of the validation images as (features on the model's device, records)."""
    batches: callable
    steps: int  # batches per epoch in each process
    captions: int  # captions per epoch, all processes together
    validation: callable
    references: dict  # {image path: reference captions} of every validation image


def load_data(config, model, vocab, train_set, val_set, text_captions, device, procs):
    """Turn the records into batches on `device`: cached features (encoded once, each
    process its share) or, with --fine-tune-encoder, a DataLoader of augmented images."""
    batch_size, seed = config.batch_size, config.seed
    train_idx, train_tokens = encode_captions(train_set, vocab, config.max_caption_length)
    train_paths = [r.image for r in train_set]

    def sampler(n, epoch):
        # The same shuffle in every process (seed + epoch), each taking its share, padded so
        # that all take the same number of steps (DDP needs that).
        s = DistributedSampler(range(n), num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        return s

    if config.fine_tune_encoder:
        pairs = PairsWithImages(train_paths, train_idx.tolist(), train_tokens)
        workers = min(4, os.cpu_count() or 1) if config.workers is None else config.workers

        def batches(epoch):
            return torch.utils.data.DataLoader(pairs, batch_size=batch_size, sampler=sampler(len(pairs), epoch),
                                               num_workers=workers, collate_fn=_collate_pairs,
                                               pin_memory=device.type == "cuda")

        def validation():
            return encode_records(model, procs.share(val_set), device, config.workers)

        steps = math.ceil(math.ceil(len(pairs) / procs.world) / batch_size)
        return TrainData(batches, steps, len(pairs), validation, {str(r.image): r.captions for r in val_set})

    cache_dir = config.cache_dir or DEFAULT_CACHE_DIR
    all_paths = train_paths + [r.image for r in val_set]
    if procs.world > 1:  # each process encodes its share of what the store lacks; then every one reads all
        encode_missing(model, all_paths, device, cache_dir, num_workers=config.workers, backend=config.backend,
                       part=(procs.rank, procs.world))
        procs.barrier()
    features, ok = compute_features(model, all_paths, device, cache_dir, num_workers=config.workers,
                                    backend=config.backend)
    train_features, val_features = features[:len(train_paths)], features[len(train_paths):]
    train_ok, val_ok = ok[:len(train_paths)], ok[len(train_paths):]
    keep = torch.tensor(train_ok)[train_idx]
    train_idx, train_tokens = train_idx[keep], train_tokens[keep]
    if len(train_idx) == 0:
        raise ValueError(f"{config.data}: no usable training captions")
    val_set = [r for r, good in zip(val_set, val_ok, strict=True) if good]
    val_features = val_features[torch.tensor(val_ok)]
    references = {str(r.image): r.captions for r in val_set}
    val_share = (procs.share(val_features).to(device), procs.share(val_set))  # decoded by the model, on its device

    train_features = train_features.to(device)
    with torch.inference_mode():
        train_concepts = model.decoder_concepts(model.classify_features(train_features))
    # Text-only captions join the pairs with image index -1: no feature, concepts from their words.
    text_tokens = encode_captions([Record(Path(), text_captions)], vocab, config.max_caption_length)[1] \
        if text_captions else torch.empty(0, config.max_caption_length + 2, dtype=torch.long)
    num_concepts, feature_dim = model.config.num_concepts, model.config.feature_dim
    text_concepts = text_concept_lists(model.concepts, text_tokens, vocab) if num_concepts else []
    n_pairs, n_text = len(train_idx), len(text_tokens)  # rows before n_pairs are photo captions, the rest text
    n_drawn = round(n_text * config.text_sample)
    train_idx = torch.cat([train_idx, torch.full((n_text,), -1, dtype=torch.long)])
    train_tokens = torch.cat([train_tokens, text_tokens])

    def batches(epoch):
        # Every pair and a fresh draw of `text_sample` of the text-only captions (the same
        # draw in every process), shuffled; this process's share of each global batch.
        drawn = torch.randperm(n_text, generator=torch.Generator().manual_seed(seed + epoch))[:n_drawn] + n_pairs
        rows = torch.cat([torch.arange(n_pairs), drawn])
        order = rows[torch.tensor(list(sampler(len(rows), epoch)), dtype=torch.long)]
        for s in range(0, len(order), batch_size):
            j = order[s:s + batch_size]
            idx = train_idx[j]
            photo = idx >= 0
            # (b, feature_dim): a photo's feature, zeros for text, some photos' dropped
            keep = photo & (torch.rand(len(j)) >= config.feature_dropout)
            feats = torch.zeros(len(j), feature_dim, device=device)
            feats[keep.to(device)] = train_features[idx[keep].to(device)]
            conc = None
            if num_concepts:
                conc = torch.zeros(len(j), num_concepts, device=device)
                conc[photo.to(device)] = train_concepts[idx[photo].to(device)]
                text_rows = (~photo).nonzero().flatten()
                if len(text_rows):
                    conc[text_rows.to(device)] = noisy_concepts(
                        [text_concepts[int(j[r]) - n_pairs] for r in text_rows], num_concepts).to(device)
            yield feats, conc, train_tokens[j], 0

    rows_per_epoch = n_pairs + n_drawn
    steps = math.ceil(math.ceil(rows_per_epoch / procs.world) / batch_size)
    return TrainData(batches, steps, rows_per_epoch, lambda: val_share, references)


def encode_records(model, records, device, num_workers):
    """Features of the records' images with the current (fine-tuned) encoder.
    -> (features, the records whose image could be read)."""
    feats, kept = [], []
    model.eval()
    with torch.inference_mode():
        for idx, pixels, _ in image_loader([r.image for r in records], num_workers=num_workers,
                                           pin_memory=device.type == "cuda"):
            if pixels is not None:
                feats.append(model.encode_images(pixels.to(device)))
                kept.extend(records[i] for i in idx)
    if not kept and records:
        raise ValueError("no readable validation images")
    dim = model.config.feature_dim
    return (torch.cat(feats) if feats else torch.zeros(0, dim, device=device)), kept


# ---------------------------------------------------------------- model

def build_model(config, train_set, text_captions, state, device):
    """The model and vocabulary a run trains: from its saved state when resuming, from
    --init-from (its architecture and words, this data's new words appended), or new."""
    source = DEFAULT_WEIGHTS if config.init_from == "default" else config.init_from
    init = None if state or not source else read_checkpoint(source)
    if state:
        vocab = Vocabulary.from_json(state["vocab"])
    else:
        vocab = Vocabulary.build([c for r in train_set for c in r.captions] + text_captions, config.min_word_count)
        if init:  # the trained words keep their ids; this data's new words are appended
            vocab = Vocabulary(init[1].itos + [w for w in vocab.itos[4:] if w not in init[1].stoi])
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise ValueError(f"{config.data}: no word appears at least --min-word-count ({config.min_word_count}) times "
                         f"in the training captions, so the vocabulary would be empty; lower --min-word-count or add "
                         f"captions")
    if state:
        concept_map = ConceptMap.from_json(state["concepts"]) if "concepts" in state else shipped_concepts()
        model_config = ModelConfig(**json.loads(state["model_config"]))
    elif init:
        concept_map, model_config = init[2], dataclasses.replace(init[0], vocab_size=len(vocab))
    else:
        concept_map = shipped_concepts()
        model_config = ModelConfig(vocab_size=len(vocab), embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                                   num_layers=config.num_layers, cell=config.cell, dropout=config.dropout,
                                   num_concepts=len(concept_map) if config.concepts else 0)
    model = CaptionModel(model_config, concepts=concept_map).to(device)
    if init:
        warm_start(model, init[3], config.fine_tune_encoder, source)
        log.info("warm start from %s (%d words kept, %d new)", source, len(init[1]),
                 len(vocab) - len(init[1]))
    model.encoder_tuned = config.fine_tune_encoder
    model.encoder.requires_grad_(config.fine_tune_encoder)
    # The classifier head only gives concepts (under no_grad): no gradient reaches it, and
    # DDP refuses trainable weights that get none.
    model.encoder._fc.requires_grad_(False)
    return model, vocab


def warm_start(model, tensors, fine_tune_encoder, source):
    """Copy a checkpoint's weights (`tensors`, as read_checkpoint gives them) into `model`,
    whose vocabulary may be longer: the rows of words the checkpoint knows are copied and
    the new words' rows keep their fresh initialisation."""
    encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    if encoder and not fine_tune_encoder:
        # Stored features come from the packaged encoder; a tuned one must run in the loop.
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


class TrainStep(torch.nn.Module):
    """The training forward pass as one module, so that DDP can wrap it: pixels (encoder
    tuned) or features, and caption tokens -> next-word logits (B, T, V)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs, tokens, concepts=None):
        model = self.model
        features = model.encode_images(inputs) if model.encoder_tuned else inputs
        if concepts is None:  # photos in the loop: the classifier's view, not trained through
            with torch.no_grad():
                concepts = model.decoder_concepts(model.classify_features(features.detach()))
        return model.decoder(features, tokens, concepts)


# ---------------------------------------------------------------- one epoch, evaluation

def amp_dtype(device, amp=True):
    """The autocast type for training on `device`, or None for fp32: bf16 where the GPU
    computes it natively (compute capability 8.0+: A100, H100, RTX 30xx and later), fp16 with
    loss scaling elsewhere (T4, V100: torch.cuda.is_bf16_supported() says yes there too, but
    emulates it, slowly). No autocast on the CPU."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def caption_loss(logits, targets, label_smoothing=0.0):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=PAD_ID, label_smoothing=label_smoothing)


def batch_to_device(inputs, concepts, tokens, device):
    """A batch on the model's device, its padding trimmed to the longest caption (on the
    CPU, before the copy: reading a length back from a GPU would wait for it)."""
    tokens = tokens[:, :int((tokens != PAD_ID).sum(1).max())].to(device, non_blocking=True)
    concepts = concepts.to(device, non_blocking=True) if concepts is not None else None
    return inputs.to(device, non_blocking=True), concepts, tokens


def train_one_epoch(model, step, optimizer, scaler, batches, device, config, desc, steps, show=True):
    """One pass over `batches` with `step` (TrainStep, DDP-wrapped under torchrun).
    -> (mean loss of this process, captions, images skipped)."""
    model.train()
    if not model.encoder_tuned:
        model.encoder.eval()
    else:
        # Small batches make BatchNorm statistics noisy: keep the pretrained ones.
        for m in model.encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    dtype = amp_dtype(device, config.amp)
    total, count, skipped = 0.0, 0, 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, total=steps, disable=not show)
    for inputs, concepts, tokens, n_skipped in bar:
        skipped += n_skipped
        if inputs is None:
            continue
        inputs, concepts, tokens = batch_to_device(inputs, concepts, tokens, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = step(inputs, tokens[:, :-1], concepts)
            loss = caption_loss(logits.float(), tokens[:, 1:], config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(tokens)
        count += len(tokens)
        bar.set_postfix(loss=f"{total / count:.3f}")
    return total / max(count, 1), count, skipped


@torch.inference_mode()
def validation_loss(model, vocab, features, records, max_length, label_smoothing, batch_size=250):
    """Teacher-forced loss on the validation images' reference captions (the training loss's
    twin: a gap between them that grows means over-fitting). -> (summed loss tensor, captions)."""
    model.eval()
    index, tokens = encode_captions(records, vocab, max_length)
    total, count = torch.zeros((), device=features.device), 0
    for s in range(0, len(tokens), batch_size):
        feats = features[index[s:s + batch_size].to(features.device)]
        _, _, toks = batch_to_device(feats, None, tokens[s:s + batch_size], features.device)
        concepts = model.decoder_concepts(model.classify_features(feats))
        logits = model.decoder(feats, toks[:, :-1], concepts)
        total = total + caption_loss(logits.float(), toks[:, 1:], label_smoothing) * len(toks)
        count += len(toks)
    return total, count


@torch.inference_mode()
def evaluate(model, vocab, features, records, references, config, procs, batch_size=250):
    """Decode this process's validation images as users get them (config.decode: grounding
    included), gather every process's captions and score them against all references.
    -> (scores, {image path: caption}, validation loss); the same in every process."""
    model.eval()
    predictions = {}
    for start in range(0, len(records), batch_size):
        chunk = features[start:start + batch_size]
        for r, result in zip(records[start:start + batch_size],
                             decode_features(model, vocab, chunk, config.decode), strict=True):
            predictions[str(r.image)] = result["caption"]
    loss, count = validation_loss(model, vocab, features, records, config.max_caption_length,
                                  config.label_smoothing)
    parts = procs.gather((predictions, loss.item(), count))
    predictions = {k: v for part, _, _ in parts for k, v in part.items()}
    predictions = {k: predictions[k] for k in references if k in predictions}  # the records' order
    val_loss = sum(p[1] for p in parts) / max(1, sum(p[2] for p in parts))
    scores = score_captions(predictions, {k: references[k] for k in predictions}, use_java=False, cider_only=True)
    return scores, predictions, val_loss


# ---------------------------------------------------------------- run state

def load_run_state(config, resume):
    """The saved state of the run in config.out when resuming (None otherwise), refused
    where the run cannot continue as asked."""
    out = Path(config.out)
    state_file = out / "train_state.pt"
    if resume and not state_file.is_file():
        raise FileNotFoundError(f"--resume: no {state_file} to resume from")
    if not resume and state_file.is_file():  # never overwrite an earlier run's checkpoints
        raise ValueError(f"{out} already holds a training run; use --resume to continue it, or another --out")
    if not resume:
        return None
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    stored = _stored_config(state)
    changed = config.fixed_differences(stored) if stored else []
    if changed:
        raise ValueError("--resume: " + "; ".join(changed)
                         + ". A started run keeps these; start a new run (another --out) to change them")
    return state


def save_run_state(path, model, optimizer, scaler, config, vocab, epoch, best, bad_epochs, base_lrs,
                   lr_decay_epochs, rngs):
    save_state({
        "config": json.dumps(config.to_dict()), "decoder": model.decoder.state_dict(),
        **({"encoder": model.encoder.state_dict()} if model.encoder_tuned else {}),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "base_lrs": base_lrs, "lr_decay_epochs": lr_decay_epochs,
        "epoch": epoch, "best": best, "bad_epochs": bad_epochs,
        "rng": rngs,  # one entry per process, in rank order
        "vocab": vocab.to_json(), "model_config": json.dumps(model.config.to_dict()),
        "concepts": model.concepts.to_json(),
    }, path)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": _list_state(random.getstate()),
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def restore_rng(states, procs):
    if len(states) != procs.world:
        log.warning("the run had %d process(es), now %d: its batches from here on differ from an "
                    "uninterrupted run's", len(states), procs.world)
    s = states[procs.rank % len(states)]
    torch.set_rng_state(s["torch"])
    random.setstate(_tuple_state(s["python"]))
    if torch.cuda.is_available() and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"])


def _stored_config(state):
    if "config" in state:
        return TrainConfig.from_dict(json.loads(state["config"]))
    if "settings" in state:  # runs started before TrainConfig (the train() keywords of then)
        old = json.loads(state["settings"])
        old["workers"] = old.pop("num_workers", None)
        old["decode"] = {**(old.get("decode") or {}), "beam_size": old.pop("beam_size", 3)}
        return TrainConfig.from_dict({**old, "out": old.get("out") or "."})
    return None


def stored_config(out):
    """The config a run in `out` was started with (its train_state.pt), or None."""
    state_file = Path(out) / "train_state.pt"
    if not state_file.is_file():
        return None
    return _stored_config(torch.load(state_file, map_location="cpu", weights_only=True))


def resume_config(out, values, given):
    """The config to resume the run in `out` with: its stored settings, with those named in
    `given` (the flags set on the command line) taken from `values` instead."""
    stored = stored_config(out)
    if stored is None:
        return TrainConfig(**values)
    merged = {**stored.to_dict(), **{k: v for k, v in values.items() if k in given}, "out": values["out"]}
    return TrainConfig.from_dict(merged)


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


# ---------------------------------------------------------------- main loop

def train(config, resume=False):
    """Train a captioner as `config` (a TrainConfig) says and write best.safetensors,
    last.safetensors, train_state.pt, metrics.jsonl and curves.png to config.out; `resume`
    continues the run there. Returns a summary dict."""
    procs, device = init_processes(config.device)
    try:
        return _train(config, resume, procs, device)
    finally:
        if procs.world > 1:
            dist.destroy_process_group()


def _train(config, resume, procs, device):
    out = Path(config.out)
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        logging.getLogger("captioner").setLevel(logging.WARNING)  # one process speaks
    state = load_run_state(config, resume)
    procs.barrier()  # every process has read the state before process 0 may write a new one
    if config.text_data and config.fine_tune_encoder:
        raise ValueError("--text-data trains with cached features; it cannot be combined with --fine-tune-encoder")
    random.seed(config.seed + procs.rank)
    torch.manual_seed(config.seed + procs.rank)

    train_set, val_set, text_captions = read_records(config)
    model, vocab = build_model(config, train_set, text_captions, state, device)
    log.info("%d train and %d val images, %d text-only captions, vocabulary of %d words%s", len(train_set),
             len(val_set), len(text_captions), len(vocab), f", {procs.world} processes" if procs.world > 1 else "")
    data = load_data(config, model, vocab, train_set, val_set, text_captions, device, procs)

    step = TrainStep(model)
    if procs.world > 1:
        # No buffers to broadcast: the encoder's BatchNorm statistics never train (eval mode).
        step = torch.nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    groups = [{"params": list(model.decoder.parameters()), "lr": config.lr}]
    if config.fine_tune_encoder:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": config.encoder_lr})
    optimizer = torch.optim.Adam(groups)
    # Cosine decay over lr_decay_epochs (default: this run's --epochs), kept in the run state
    # so that a resumed run follows the schedule it started with; set it explicitly to extend
    # a finished run with --resume --epochs N as if it had been planned.
    base_lrs, lr_decay_epochs = [g["lr"] for g in groups], config.lr_decay_epochs or config.epochs
    # bf16 autocast needs no loss scaling; the scaler is a no-op unless fp16 is used.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, config.amp) == torch.float16)
    start_epoch, best, bad_epochs = 0, -math.inf, 0
    # Seed again: encoding images (DataLoaders draw seeds) must not change the training
    # order, or a run with a warm feature store would differ from one with a cold store.
    torch.manual_seed(config.seed + procs.rank)
    if state:
        model.decoder.load_state_dict(state["decoder"])
        if config.fine_tune_encoder and "encoder" in state:
            model.encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # fp16 loss scale: resumed, not re-learnt from 65536
            scaler.load_state_dict(state["scaler"])
        base_lrs, lr_decay_epochs = state["base_lrs"], state["lr_decay_epochs"]  # the schedule it started with
        start_epoch, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
        restore_rng(state["rng"] if "rng" in state else [{"torch": state["torch_rng"],
                                                            "python": state["python_rng"]}], procs)
        log.info("resumed from %s at epoch %d (best %s %.4f)", out / "train_state.pt", start_epoch + 1,
                 config.select_metric, best)

    info = {"name": out.name, "data": config.data, "train_images": len(train_set),
            "text_captions": len(text_captions), "train_config": config.to_dict()}
    metrics_file = out / "metrics.jsonl"
    if procs.main:
        start_metrics(metrics_file, resume, start_epoch)
    for epoch in range(start_epoch, config.epochs):
        t0 = time.time()
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * lr_factor(epoch, lr_decay_epochs)
        loss, n_captions, skipped = train_one_epoch(
            model, step, optimizer, scaler, data.batches(epoch), device, config,
            desc=f"epoch {epoch + 1}/{config.epochs}", steps=data.steps, show=procs.main)
        # The mean over processes of their mean losses (their batches are the same size).
        losses = procs.gather((loss, n_captions, skipped))
        loss = sum(x[0] for x in losses) / len(losses)
        n_captions, skipped = sum(x[1] for x in losses), sum(x[2] for x in losses)
        train_time = time.time() - t0
        val_features, val_records = data.validation()
        scores, predictions, val_loss = evaluate(model, vocab, val_features, val_records, data.references, config,
                                                 procs)
        score = scores[config.select_metric]
        improved = score > best
        best, bad_epochs = (score, 0) if improved else (best, bad_epochs + 1)
        rngs = procs.gather(rng_state())
        if procs.main:
            row = epoch_row(epoch, loss, val_loss, optimizer.param_groups[0]["lr"], n_captions, train_time,
                            time.time() - t0, skipped, scores, predictions)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            if improved:
                save_checkpoint(out / "best.safetensors", model, vocab,
                                {**info, "epoch": epoch + 1, f"val_{config.select_metric}": round(score, 4)})
            save_checkpoint(out / "last.safetensors", model, vocab, {**info, "epoch": epoch + 1})
            save_run_state(out / "train_state.pt", model, optimizer, scaler, config, vocab, epoch, best, bad_epochs,
                           base_lrs, lr_decay_epochs, rngs)
            log.info("epoch %d: loss %.3f, val %s %.4f, BLEU-4 %.4f%s (%.0fs)", epoch + 1, loss,
                     config.select_metric, score, scores["BLEU-4"], " *best*" if improved else "",
                     row["epoch_time_s"])
            plot_curves(metrics_file, out / "curves.png", config.select_metric)
        if bad_epochs >= config.patience:
            log.info("no improvement for %d epochs: stopping early", config.patience)
            break
    procs.barrier()  # no process leaves (and tears the group down) while process 0 still writes
    return {"best": best, "metric": config.select_metric, "out": str(out), "main": procs.main}


def start_metrics(metrics_file, resume, start_epoch):
    if not resume and metrics_file.exists():
        metrics_file.unlink()
    elif resume and metrics_file.exists():  # drop rows of an epoch that stopped before its state was saved
        rows = [line for line in metrics_file.read_text().splitlines() if line.strip()]
        metrics_file.write_text("".join(r + "\n" for r in rows if json.loads(r)["epoch"] <= start_epoch))


def epoch_row(epoch, loss, val_loss, lr, n_captions, train_time, epoch_time, skipped, scores, predictions):
    """One metrics.jsonl row: losses, validation scores, speed, and how the model talks."""
    distinct = len(set(predictions.values())) / max(1, len(predictions))
    if len(predictions) >= 10 and distinct < 0.3:
        log.warning("epoch %d: only %d distinct captions for %d validation images: the model may be "
                    "collapsing to a few generic captions", epoch + 1, len(set(predictions.values())),
                    len(predictions))
    return {"epoch": epoch + 1, "train_loss": round(loss, 4), "val_loss": round(val_loss, 4), "lr": lr,
            "captions": n_captions, "train_time_s": round(train_time, 1),
            "captions_per_s": round(n_captions / train_time, 1), "epoch_time_s": round(epoch_time, 1),
            "skipped_images": skipped, **{f"val_{k}": round(v, 4) for k, v in scores.items() if k != "tokenizer"},
            "val_distinct_captions": round(distinct, 4),
            "samples": {Path(k).name: v for k, v in list(predictions.items())[:SAMPLE_CAPTIONS]}}


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
