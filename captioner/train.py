"""Training: `captioner train`. Shaped like torchvision's reference scripts: `load_data`
(train_data.py), `train_one_epoch`, `evaluate`, the run state (run_state.py) and a short
main loop (`train`) that checkpoints, resumes and logs. Every setting and its default lives
in `options.TrainConfig`.

Recipe: teacher forcing with cross-entropy that ignores padding (with label smoothing),
Adam, gradient-norm clipping, cosine learning-rate decay to LR_FLOOR, and early stopping on
the validation CIDEr of beam-decoded captions. With the encoder frozen (the default), image
features are computed once and kept in the feature store (features.py), so an epoch on a
CPU is a decoder-only pass; --fine-tune-encoder runs images through the encoder at every
step instead.

Several processes (`torchrun --nproc_per_node N -m captioner train ...`): one per GPU (or
CPU processes with gloo), DistributedDataParallel over the trained weights, each process
taking its share of every global batch and of the images to encode and to decode for
validation; process 0 writes checkpoints, logs and metrics, and every process resumes from
the same train_state.pt.

Self-critical sequence training (`--objective scst`, Rennie et al. 2017): a stage after
cross-entropy that optimises CIDEr-D directly. For every photo of a batch the decoder samples
several captions; each is rewarded with its CIDEr-D against the photo's references (document
frequencies from all training references, <END> counted as a word), the baseline of a
sample is the mean reward of the photo's other samples (Luo 2020), and the loss is
-(reward - baseline) * the sample's log-probability. Validation, checkpoints, early stopping
and resume are the same as under cross-entropy.

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
from tqdm import tqdm

from . import run_state
from .checkpoint import load_model, read_checkpoint, save_checkpoint
from .evidence import PersonHead
from .concepts import shipped_concepts
from .inference import DEFAULT_WEIGHTS, decode_features, resolve_device
from .metrics import score_captions
from .model import BANNED_IDS, CaptionModel, ModelConfig
from .options import DEFAULT_ENCODER
from .train_data import load_data, read_training_records, tokenize_captions
from .vocab import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, Vocabulary

log = logging.getLogger(__name__)
LR_FLOOR = 0.05  # the cosine schedule ends at this share of each base learning rate
# Where a run starts (starting_point): under this many training photos, from the shipped
# model; the learning rates of a new model and of one that starts from a trained model.
SMALL_DATA_PHOTOS = 2000
NEW_MODEL_LR = 4e-4
WARM_START_LR = 1e-4
# A small run from scratch under this share of the shipped model's validation score is warned about.
FAR_UNDER = 0.7
SAMPLE_CAPTIONS = 5  # validation captions kept in each metrics.jsonl row, to read how the model talks


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


# ---------------------------------------------------------------- model

def build_model(config, train_set, text_captions, state, device):
    """The model and vocabulary a run trains: from its saved RunState when resuming, from
    --init-from (its architecture and words, this data's new words appended), or new."""
    source = DEFAULT_WEIGHTS if config.init_from == "default" else config.init_from
    init = None if state or not source else read_checkpoint(source)
    if state:
        vocab = state.vocab
    else:
        vocab = Vocabulary.build([c for r in train_set for c in r.captions] + text_captions, config.min_word_count)
        if init:  # the trained words keep their ids; this data's new words are appended
            vocab = Vocabulary(init[1].itos + [w for w in vocab.itos[4:] if w not in init[1].stoi])
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise ValueError(f"{config.data}: no word appears at least --min-word-count ({config.min_word_count}) times "
                         f"in the training captions, so the vocabulary would be empty; lower --min-word-count or add "
                         f"captions")
    if state:
        concept_map, model_config = state.concepts, state.model_config
    elif init:  # the starting model's architecture, with or without attention as --arch says
        if config.encoder not in (None, init[0].encoder):
            raise ValueError(f"--encoder {config.encoder}: {source} reads {init[0].encoder} features, and a warm "
                             f"start keeps its encoder; train a new model (no --init-from, and --from-scratch on a "
                             f"small data set) for another one")
        concept_map = init[2]
        model_config = dataclasses.replace(init[0], vocab_size=len(vocab), attention=config.arch == "attention")
    else:
        concept_map = shipped_concepts()
        model_config = ModelConfig(vocab_size=len(vocab), embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                                   num_layers=config.num_layers, cell=config.cell, dropout=config.dropout,
                                   encoder=config.encoder or DEFAULT_ENCODER,
                                   num_concepts=len(concept_map) if config.concepts else 0,
                                   attention=config.arch == "attention")
    model = CaptionModel(model_config, concepts=concept_map).to(device)
    if init:
        warm_start(model, init[3], config.fine_tune_encoder, source)
        log.info("warm start from %s (%d words kept, %d new)", source, len(init[1]),
                 len(vocab) - len(init[1]))
    if source and not config.fine_tune_encoder:
        model.person_head = person_head_of(init[3] if init else read_checkpoint(source)[3], source, model_config)
    model.encoder_tuned = config.fine_tune_encoder
    model.encoder.requires_grad_(config.fine_tune_encoder)
    # The classifier head only gives concepts (under no_grad): no gradient reaches it, and
    # DDP refuses trainable weights that get none.
    model.encoder._fc.requires_grad_(False)
    return model, vocab


def person_head_of(tensors, source, model_config):
    """The person detector of the checkpoint a run starts from, or None: it reads the frozen
    encoder's feature, which training does not change, so it stays valid. The confidence
    depends on the decoder and is not carried over: `captioner calibrate` fits it anew."""
    head = {k[len("person_head."):]: v for k, v in tensors.items() if k.startswith("person_head.")}
    if not head:
        return None
    log.info("the person detector of %s is kept; run `captioner calibrate` on the new model for a confidence",
             source)
    person_head = PersonHead(model_config.feature_dim)
    person_head.load_state_dict(head)
    return person_head


def warm_start(model, tensors, fine_tune_encoder, source):
    """Copy a checkpoint's weights (`tensors`, as read_checkpoint gives them) into `model`,
    whose vocabulary may be longer: the rows of words the checkpoint knows are copied and
    the new words' rows keep their fresh initialisation. A pooled decoder warm-starts an
    attention one: the attention layers start fresh and the recurrent cell's weights for
    the context vector at zero, so that the new model starts out captioning exactly as the
    old one and learns to use the map from there. (The other way round, the attention
    layers are dropped.)"""
    encoder = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    if encoder and not fine_tune_encoder:
        # Stored features come from the packaged encoder; a tuned one must run in the loop.
        raise ValueError(f"{source} has a fine-tuned encoder; warm-starting from it needs --fine-tune-encoder")
    if encoder:
        model.encoder.load_state_dict(encoder)
    own = model.decoder.state_dict()
    for key, old in tensors.items():
        name = key[len("decoder."):]
        if not key.startswith("decoder.") or name not in own:  # attention layers a pooled model lacks
            continue
        new = own[name]
        if name == "rnn.weight_ih_l0" and old.shape[1] != new.shape[1]:  # (4H, E) <-> (4H, 2E): word [+ context]
            width = min(old.shape[1], new.shape[1])
            new.zero_()
            new[:, :width] = old[:, :width]
            continue
        if old.shape != new.shape and (old.shape[1:] != new.shape[1:] or old.shape[0] > new.shape[0]):
            raise ValueError(f"{source}: {key} has shape {tuple(old.shape)}, the model {tuple(new.shape)}")
        new[:old.shape[0]] = old  # the vocabulary rows (embed, out) grow; all else is equal
    model.decoder.load_state_dict(own)


class TrainStep(torch.nn.Module):
    """The training forward pass as one module, so that DDP can wrap it: pixels (encoder
    tuned) or features and maps, and caption tokens -> next-word logits (B, T, V)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs, spatial, tokens, concepts=None):
        model = self.model
        features, spatial = model.encode_images(inputs) if model.encoder_tuned else (inputs, spatial)
        if concepts is None:  # photos in the loop: the classifier's view, not trained through
            with torch.no_grad():
                concepts = model.decoder_concepts(model.classify_features(features.detach()))
        return model.decoder(features, tokens, concepts, spatial)


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


def batch_to_device(inputs, spatial, concepts, tokens, device):
    """A batch on the model's device, its padding trimmed to the longest caption (on the
    CPU, before the copy: reading a length back from a GPU would wait for it)."""
    tokens = tokens[:, :int((tokens != PAD_ID).sum(1).max())].to(device, non_blocking=True)
    concepts = concepts.to(device, non_blocking=True) if concepts is not None else None
    spatial = spatial.to(device, non_blocking=True) if spatial is not None else None
    return inputs.to(device, non_blocking=True), spatial, concepts, tokens


def train_one_epoch(model, step, optimizer, scaler, batches, device, epoch, config, show=True):
    """One pass over `batches` (train_data's FeatureBatches or ImageBatches; ScstBatches with
    --objective scst) with `step` (TrainStep, DDP-wrapped under torchrun). -> (mean loss of
    this process, captions, images skipped, {extra metrics.jsonl values: means})."""
    model.train()
    if not model.encoder_tuned:
        model.encoder.eval()
    else:
        # Small batches make BatchNorm statistics noisy: keep the pretrained ones.
        for m in model.encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    if config.objective == "scst":
        return scst_epoch(model, step, optimizer, scaler, batches, device, epoch, config, show)
    dtype = amp_dtype(device, config.amp)
    total, count, skipped = 0.0, 0, 0
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False, total=len(batches),
               disable=not show)
    for inputs, spatial, concepts, tokens, n_skipped in bar:
        skipped += n_skipped
        if inputs is None:
            continue
        inputs, spatial, concepts, tokens = batch_to_device(inputs, spatial, concepts, tokens, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = step(inputs, spatial, tokens[:, :-1], concepts)
            loss = caption_loss(logits.float(), tokens[:, 1:], config.label_smoothing)
        optimizer_step(model, optimizer, scaler, loss, config.clip_grad)
        total += loss.item() * len(tokens)
        count += len(tokens)
        bar.set_postfix(loss=f"{total / count:.3f}")
    return total / max(count, 1), count, skipped, {}


def optimizer_step(model, optimizer, scaler, loss, clip_grad):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


# ---------------------------------------------------------------- self-critical sequence training

def allowed_words(max_length, vocab_size, device):
    """(max_length + 1, V) bool: the words a sampled caption may have at each position, as
    greedy and beam search allow them (never <PAD>, <START> or <UNK>; at least one word;
    <END> when out of room)."""
    allowed = torch.ones(max_length + 1, vocab_size, dtype=torch.bool, device=device)
    allowed[:, BANNED_IDS] = False
    allowed[0, END_ID] = False
    allowed[max_length] = False
    allowed[max_length, END_ID] = True
    return allowed


@torch.no_grad()
def sample_captions(decoder, features, spatial, concepts, allowed):
    """One caption per row of `features` (and maps), drawn word by word from the decoder's
    softmax (restricted to `allowed`). -> (N, T) token ids: the words, <END>, then <PAD>."""
    state = decoder.init_state(features, concepts)
    context = decoder.context(concepts, spatial)
    tokens = torch.full((len(features),), START_ID, dtype=torch.long, device=features.device)
    finished = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    words = []
    for t in range(len(allowed)):
        logp, state = decoder.step(tokens, state, context)
        probs = logp.masked_fill(~allowed[t], float("-inf")).exp()  # multinomial normalises
        tokens = torch.multinomial(probs, 1).squeeze(1).masked_fill(finished, PAD_ID)
        words.append(tokens)
        finished |= tokens == END_ID
        if finished.all():
            break
    return torch.stack(words, 1)


def sample_log_probs(logits, samples, allowed):
    """Summed log-probabilities (N,) of each sampled caption (its <END> included) under
    teacher-forced `logits` (N, T, V), with the sampling's restrictions."""
    logp = logits.float().masked_fill(~allowed[:samples.size(1)], float("-inf")).log_softmax(-1)
    words = samples != PAD_ID
    picked = logp.gather(2, samples.masked_fill(~words, END_ID).unsqueeze(2)).squeeze(2)  # finite everywhere
    return (picked * words).sum(1)


def self_critical_advantage(rewards):
    """rewards (B, K): K samples per image -> (advantage, baseline), both (B, K). The
    baseline of a sample is the mean reward of the image's other samples (Luo 2020, "a
    better variant of self-critical sequence training"): no greedy decode needed, and it
    does not depend on the sample it judges."""
    k = rewards.size(1)
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline, baseline


def scst_batch_loss(model, step, features, spatial, concepts, images, cider, config, allowed):
    """Sample config.scst_samples captions per photo, reward each with its CIDEr-D against
    the photo's references, and -> (policy-gradient loss, rewards (B, K))."""
    k = config.scst_samples
    features = features.repeat_interleave(k, 0)
    spatial = spatial.repeat_interleave(k, 0) if spatial is not None else None
    concepts = concepts.repeat_interleave(k, 0) if concepts is not None else None
    samples = sample_captions(model.decoder, features, spatial, concepts, allowed)
    lengths = (samples != PAD_ID).sum(1).tolist()
    captions = [row[:n] for row, n in zip(samples.tolist(), lengths, strict=True)]
    rewards = cider.score(images.repeat_interleave(k).tolist(), captions, device=features.device).view(-1, k)
    advantage, _ = self_critical_advantage(rewards)
    starts = torch.full((len(samples), 1), START_ID, dtype=torch.long, device=samples.device)
    logits = step(features, spatial, torch.cat([starts, samples[:, :-1]], 1), concepts)
    log_probs = sample_log_probs(logits, samples, allowed)
    return -(advantage.flatten() * log_probs).mean(), rewards


def scst_epoch(model, step, optimizer, scaler, batches, device, epoch, config, show):
    """One SCST pass over `batches` (ScstBatches). -> (mean loss, captions sampled, 0,
    {"train_reward": mean CIDEr-D of the samples, "train_advantage": mean |reward - baseline|})."""
    # Dropout off: the log-probabilities trained are those of the policy that drew the samples.
    for m in model.decoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    allowed = allowed_words(config.max_caption_length, model.config.vocab_size, device)
    dtype = amp_dtype(device, config.amp)
    total, reward, spread, count = 0.0, 0.0, 0.0, 0
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs} (scst)", unit="batch", leave=False,
               total=len(batches), disable=not show)
    for features, spatial, concepts, images, _ in bar:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, rewards = scst_batch_loss(model, step, features, spatial, concepts, images, batches.cider, config,
                                            allowed)
        optimizer_step(model, optimizer, scaler, loss, config.clip_grad)
        total += loss.item() * rewards.numel()
        reward += rewards.sum().item()
        spread += self_critical_advantage(rewards)[0].abs().sum().item()
        count += rewards.numel()
        bar.set_postfix(reward=f"{reward / count:.3f}")
    n = max(count, 1)
    return total / n, count, 0, {"train_reward": reward / n, "train_advantage": spread / n}


@torch.inference_mode()
def validation_loss(model, vocab, features, maps, records, max_length, label_smoothing, batch_size=250):
    """Teacher-forced loss on the validation images' reference captions (the training loss's
    twin: a gap between them that grows means over-fitting). -> (summed loss tensor, captions)."""
    model.eval()
    index, tokens = tokenize_captions(records, vocab, max_length)
    total, count = torch.zeros((), device=features.device), 0
    for s in range(0, len(tokens), batch_size):
        rows = index[s:s + batch_size].to(features.device)
        feats, spatial = features[rows], maps[rows] if maps is not None else None
        _, spatial, _, toks = batch_to_device(feats, spatial, None, tokens[s:s + batch_size], features.device)
        concepts = model.decoder_concepts(model.classify_features(feats))
        logits = model.decoder(feats, toks[:, :-1], concepts, spatial)
        total = total + caption_loss(logits.float(), toks[:, 1:], label_smoothing) * len(toks)
        count += len(toks)
    return total, count


@torch.inference_mode()
def evaluate(model, vocab, validation, device, config, procs, batch_size=250):
    """Decode this process's validation images (train_data.Validation) as users get them
    (config.decode: grounding included), gather every process's captions and score them
    against all references. -> (scores, {image path: caption}, validation loss); the same
    in every process."""
    features, maps, records = validation.encoded(model, device)
    model.eval()
    predictions = {}
    for start in range(0, len(records), batch_size):
        chunk = features[start:start + batch_size]
        spatial = maps[start:start + batch_size] if maps is not None else None
        for r, result in zip(records[start:start + batch_size],
                             decode_features(model, vocab, chunk, config.decode, spatial), strict=True):
            predictions[str(r.image)] = result["caption"]
    loss, count = validation_loss(model, vocab, features, maps, records, config.max_caption_length,
                                  config.label_smoothing)
    parts = procs.gather((predictions, loss.item(), count))
    predictions = {k: v for part, _, _ in parts for k, v in part.items()}
    references = validation.references
    predictions = {k: predictions[k] for k in references if k in predictions}  # the records' order
    val_loss = sum(p[1] for p in parts) / max(1, sum(p[2] for p in parts))
    scores = score_captions(predictions, {k: references[k] for k in predictions}, use_java=False, cider_only=True)
    return scores, predictions, val_loss


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
    state = run_state.state_to_resume(config, resume)
    procs.barrier()  # every process has read the state before process 0 may write a new one
    if config.text_data and config.fine_tune_encoder:
        raise ValueError("--text-data trains with cached features; it cannot be combined with --fine-tune-encoder")
    if config.objective == "scst" and config.fine_tune_encoder:
        raise ValueError("--objective scst trains the decoder on stored features; it cannot be combined with "
                         "--fine-tune-encoder")
    random.seed(config.seed + procs.rank)
    torch.manual_seed(config.seed + procs.rank)

    train_set, val_set, text_captions = read_training_records(config)
    config = starting_point(config, len(train_set), state)
    model, vocab = build_model(config, train_set, text_captions, state, device)
    log.info("%d train and %d val images, %d text-only captions, vocabulary of %d words%s", len(train_set),
             len(val_set), len(text_captions), len(vocab), f", {procs.world} processes" if procs.world > 1 else "")
    if config.objective == "scst" and text_captions:
        log.info("--objective scst: the text-only captions widen the vocabulary but are not trained on (no photo to "
                 "score a sample against)")
    batches, validation = load_data(config, model, vocab, train_set, val_set, text_captions, device, procs)
    step = train_step(model, procs, device)
    optimizer, scaler = make_optimizer(config, model, device)
    # Seed again: encoding images (DataLoaders draw seeds) must not change the training
    # order, or a run with a warm feature store would differ from one with a cold store.
    torch.manual_seed(config.seed + procs.rank)
    progress = resume_from(state, model, optimizer, scaler, config, procs) if state else new_progress(config, optimizer)

    info = {"name": out.name, "data": config.data, "train_images": len(train_set),
            "text_captions": len(text_captions), "train_config": config.to_dict()}
    if procs.main:
        start_metrics(out / "metrics.jsonl", resume, progress.epoch + 1)
    for epoch in range(progress.epoch + 1, config.epochs):
        t0 = time.time()
        for group, base_lr in zip(optimizer.param_groups, progress.base_lrs, strict=True):
            group["lr"] = base_lr * lr_factor(epoch, progress.lr_decay_epochs)
        batches.set_epoch(epoch)
        trained = train_one_epoch(model, step, optimizer, scaler, batches, device, epoch, config, show=procs.main)
        trained = all_processes(procs, *trained)
        train_time = time.time() - t0
        scores, predictions, val_loss = evaluate(model, vocab, validation, device, config, procs)
        improved = progress.record(epoch, scores[config.select_metric])
        rngs = procs.gather(run_state.rng_state())  # process 0 saves every process's
        if procs.main:
            row = epoch_row(epoch, optimizer.param_groups[0]["lr"], trained, val_loss, scores, predictions,
                            (train_time, time.time() - t0))
            save_epoch(out, row, model, vocab, info, improved,
                       run_state.RunState.capture(config, model, vocab, optimizer, scaler, progress, rngs))
            reward = f", train reward {trained[3]['train_reward']:.4f}" if "train_reward" in trained[3] else ""
            log.info("epoch %d: loss %.3f%s, val %s %.4f, BLEU-4 %.4f%s (%.0fs)", epoch + 1, trained[0], reward,
                     config.select_metric, scores[config.select_metric], scores["BLEU-4"],
                     " *best*" if improved else "", row["epoch_time_s"])
            plot_curves(out / "metrics.jsonl", out / "curves.png", config.select_metric)
        if progress.bad_epochs >= config.patience:
            log.info("no improvement for %d epochs: stopping early", config.patience)
            break
    if config.init_from is None and len(train_set) < SMALL_DATA_PHOTOS:
        warn_if_far_under_the_shipped_model(progress.best, len(train_set), validation, device, config, procs)
    procs.barrier()  # no process leaves (and tears the group down) while process 0 still writes
    return {"best": progress.best, "metric": config.select_metric, "out": str(out), "main": procs.main}


def starting_point(config, train_photos, state):
    """`config` with where a new run starts settled: a data set under SMALL_DATA_PHOTOS
    starts from the shipped model (a new model learns little from a few hundred photos)
    unless --from-scratch; the learning rate defaults to NEW_MODEL_LR, or WARM_START_LR
    from a trained model. A resumed run keeps what it started with."""
    if state:
        return config
    changes = {}
    if config.init_from is None and not config.from_scratch and train_photos < SMALL_DATA_PHOTOS \
            and config.encoder in (None, DEFAULT_ENCODER):  # the shipped model's encoder
        changes["init_from"] = "default"
        log.info("%d training photos: starting from the shipped model (--init-from default); --from-scratch trains "
                 "a new model instead", train_photos)
    if config.lr is None:
        changes["lr"] = WARM_START_LR if changes.get("init_from", config.init_from) else NEW_MODEL_LR
    return config.replace(**changes) if changes else config


def warn_if_far_under_the_shipped_model(best, train_photos, validation, device, config, procs):
    """A small data set trained from scratch: say so when the shipped model captions the same
    validation photos far better, with the way to start from it (every process scores, as
    in evaluate; process 0 speaks)."""
    shipped, vocab, _ = load_model(DEFAULT_WEIGHTS)
    scores = evaluate(shipped.to(device), vocab, validation, device, config, procs)[0]
    if procs.main and best < FAR_UNDER * scores[config.select_metric]:
        log.warning("best val %s %.4f is far under the shipped model's %.4f on the same photos: %d photos are too "
                    "few to train a new model; drop --from-scratch (or give --init-from default --lr %g) to start "
                    "from the shipped one", config.select_metric, best, scores[config.select_metric],
                    train_photos, WARM_START_LR)


def train_step(model, procs, device):
    """TrainStep, wrapped in DistributedDataParallel under torchrun."""
    step = TrainStep(model)
    if procs.world == 1:
        return step
    # No buffers to broadcast: the encoder's BatchNorm statistics never train (eval mode).
    return torch.nn.parallel.DistributedDataParallel(
        step, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def make_optimizer(config, model, device):
    """Adam over the decoder (and the encoder at its own rate with --fine-tune-encoder), and
    the loss scaler: bf16 autocast needs no loss scaling, so it is a no-op unless fp16 is used."""
    groups = [{"params": list(model.decoder.parameters()), "lr": config.lr}]
    if config.fine_tune_encoder:
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": config.encoder_lr})
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, config.amp) == torch.float16)
    return torch.optim.Adam(groups), scaler


def new_progress(config, optimizer):
    """A new run's Progress. The cosine decay runs over lr_decay_epochs (default: this run's
    --epochs) and is kept in the run state, so that a resumed run follows the schedule it
    started with; set it explicitly to extend a finished run with --resume --epochs N as if
    it had been planned."""
    return run_state.Progress(base_lrs=[g["lr"] for g in optimizer.param_groups],
                              lr_decay_epochs=config.lr_decay_epochs or config.epochs)


def resume_from(state, model, optimizer, scaler, config, procs):
    """Continue a saved RunState: its weights, optimizer, loss scale and random state.
    -> its Progress."""
    model.decoder.load_state_dict(state.decoder)
    if config.fine_tune_encoder and state.encoder is not None:
        model.encoder.load_state_dict(state.encoder)
    optimizer.load_state_dict(state.optimizer)
    if state.scaler:  # fp16 loss scale: resumed, not re-learnt from 65536
        scaler.load_state_dict(state.scaler)
    run_state.restore_rng(state.rng, procs)
    log.info("resumed from %s at epoch %d (best %s %.4f)", Path(config.out) / run_state.STATE_FILE,
             state.progress.epoch + 2, config.select_metric, state.progress.best)
    return state.progress


def lr_factor(epoch, decay_epochs):
    """Learning-rate multiplier of 0-based `epoch`: cosine from 1 down to LR_FLOOR over
    `decay_epochs` epochs, then flat at LR_FLOOR."""
    t = min(epoch, decay_epochs) / max(decay_epochs, 1)
    return LR_FLOOR + (1 - LR_FLOOR) * (1 + math.cos(math.pi * t)) / 2


def all_processes(procs, loss, captions, skipped, extra):
    """An epoch's (loss, captions, images skipped, extra means) over every process: the
    means of their means (their batches are the same size), the counts summed."""
    parts = procs.gather((loss, captions, skipped, extra))
    means = {k: sum(x[3][k] for x in parts) / len(parts) for k in extra}
    return sum(x[0] for x in parts) / len(parts), sum(x[1] for x in parts), sum(x[2] for x in parts), means


def save_epoch(out, row, model, vocab, info, improved, state):
    """Append the epoch's metrics row, write last.safetensors (and best.safetensors when the
    score improved) and the run state."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    info = {**info, "epoch": row["epoch"]}
    if improved:
        score = {f"val_{state.config.select_metric}": round(state.progress.best, 4)}
        save_checkpoint(out / "best.safetensors", model, vocab, {**info, **score})
    save_checkpoint(out / "last.safetensors", model, vocab, info)
    run_state.save(state, out / run_state.STATE_FILE)


def start_metrics(metrics_file, resume, start_epoch):
    if not resume and metrics_file.exists():
        metrics_file.unlink()
    elif resume and metrics_file.exists():  # drop rows of an epoch that stopped before its state was saved
        rows = [line for line in metrics_file.read_text().splitlines() if line.strip()]
        metrics_file.write_text("".join(r + "\n" for r in rows if json.loads(r)["epoch"] <= start_epoch))


def epoch_row(epoch, lr, trained, val_loss, scores, predictions, times):
    """One metrics.jsonl row: losses, validation scores, speed, and how the model talks.
    trained: (loss, captions, images skipped) of all processes; times: (training, whole
    epoch) in seconds."""
    (loss, n_captions, skipped, extra), (train_time, epoch_time) = trained, times
    distinct = len(set(predictions.values())) / max(1, len(predictions))
    if len(predictions) >= 10 and distinct < 0.3:
        log.warning("epoch %d: only %d distinct captions for %d validation images: the model may be "
                    "collapsing to a few generic captions", epoch + 1, len(set(predictions.values())),
                    len(predictions))
    return {"epoch": epoch + 1, "train_loss": round(loss, 4), "val_loss": round(val_loss, 4), "lr": lr,
            "captions": n_captions, "train_time_s": round(train_time, 1),
            "captions_per_s": round(n_captions / train_time, 1), "epoch_time_s": round(epoch_time, 1),
            "skipped_images": skipped, **{k: round(v, 4) for k, v in extra.items()},
            **{f"val_{k}": round(v, 4) for k, v in scores.items() if k != "tokenizer"},
            "val_distinct_captions": round(distinct, 4),
            "samples": {Path(k).name: v for k, v in list(predictions.items())[:SAMPLE_CAPTIONS]}}


def plot_curves(metrics_file, png, select_metric):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [json.loads(line) for line in open(metrics_file)]
    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    # An SCST epoch's loss is a policy-gradient loss, not a cross-entropy: its reward is drawn instead.
    a.plot(epochs, [None if "train_reward" in r else r["train_loss"] for r in rows], marker="o", label="train")
    a.plot(epochs, [r.get("val_loss") for r in rows], marker="o", label="validation")
    a.set(title="loss (teacher-forced)", xlabel="epoch")
    a.legend()
    for key in (f"val_{select_metric}", "val_BLEU-4"):
        b.plot(epochs, [r.get(key) for r in rows], marker="o", label=key[4:])
    if any("train_reward" in r for r in rows):
        b.plot(epochs, [r.get("train_reward") for r in rows], marker="o", label="train reward (CIDEr-D of samples)")
    best = max(rows, key=lambda r: r.get(f"val_{select_metric}") or 0)["epoch"]
    b.axvline(best, color="grey", linestyle="--", label=f"best (epoch {best})")
    b.set(title="validation (beam-decoded)", xlabel="epoch")
    b.legend()
    for ax in (a, b):  # epochs are whole numbers
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
