"""Show-and-Tell captioning model: a CNN feature vector initialises the state of a
recurrent decoder (LSTM by default, GRU or plain RNN by choice), which then emits words
from <START> until <END>. Greedy and beam search decoding live here too."""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import ENCODER_NAME, FEATURE_DIM, load_encoder
from .vocab import END_ID, PAD_ID, START_ID, UNK_ID

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# Never emitted inside a caption: <PAD> and <START> are not words, and an <UNK> in an
# alt text is worse than a slightly less likely known word.
BANNED_IDS = [PAD_ID, START_ID, UNK_ID]


@dataclass
class ModelConfig:
    vocab_size: int
    feature_dim: int = FEATURE_DIM
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    cell: str = "lstm"
    dropout: float = 0.5
    encoder: str = ENCODER_NAME

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, not {self.cell!r}")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")

    def to_dict(self):
        return asdict(self)


class CaptionDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        state_size = c.num_layers * c.hidden_dim
        # Image features -> initial hidden (and, for an LSTM, cell) state of every layer.
        self.feature_norm = nn.LayerNorm(c.feature_dim)
        self.init_h = nn.Linear(c.feature_dim, state_size)
        self.init_c = nn.Linear(c.feature_dim, state_size) if c.cell == "lstm" else None
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=PAD_ID)
        self.rnn = CELLS[c.cell](c.embed_dim, c.hidden_dim, c.num_layers, batch_first=True,
                                 dropout=c.dropout if c.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.hidden_dim, c.vocab_size)

    def init_state(self, features):
        f = self.dropout(self.feature_norm(features))
        L, H = self.config.num_layers, self.config.hidden_dim

        def layers(x):  # (B, L*H) -> (L, B, H), the layout torch's RNNs expect
            return torch.tanh(x).view(-1, L, H).transpose(0, 1).contiguous()

        h = layers(self.init_h(f))
        return (h, layers(self.init_c(f))) if self.init_c is not None else h

    def forward(self, features, tokens):
        """Teacher forcing: logits (B, T, V) for predicting tokens[:, 1:] from tokens[:, :-1]
        is done by the caller; here `tokens` are the inputs."""
        x = self.dropout(self.embed(tokens))
        out, _ = self.rnn(x, self.init_state(features))
        return self.out(self.dropout(out))

    def step(self, tokens, state):
        """One decoding step: tokens (N,) -> log-probabilities (N, V) and the new state."""
        out, state = self.rnn(self.embed(tokens).unsqueeze(1), state)
        return F.log_softmax(self.out(out.squeeze(1)).float(), dim=-1), state


def reorder_state(state, index):
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)


class CaptionModel(nn.Module):
    """Encoder + decoder. The encoder is frozen unless training fine-tunes it."""

    def __init__(self, config: ModelConfig, pretrained_encoder=True):
        super().__init__()
        if config.encoder != ENCODER_NAME:
            raise ValueError(f"unknown encoder {config.encoder!r}; this version has {ENCODER_NAME!r}")
        self.config = config
        self.encoder = load_encoder(pretrained=pretrained_encoder).requires_grad_(False)
        self.encoder_tuned = False  # set by training with --fine-tune-encoder; saved with the weights
        self.decoder = CaptionDecoder(config)

    def encode_images(self, pixels):
        """(B, 3, H, W) normalised pixels -> (B, feature_dim) pooled features."""
        return self.encoder(pixels.contiguous(memory_format=torch.channels_last))

    def forward(self, pixels, tokens):
        return self.decoder(self.encode_images(pixels), tokens)


def _mask_logprobs(logp, step, max_length):
    logp[:, BANNED_IDS] = float("-inf")
    if step == 0:  # a caption has at least one word
        logp[:, END_ID] = float("-inf")
    if step == max_length:  # out of room: the only word left is <END>
        end = logp[:, END_ID].clone()
        logp.fill_(float("-inf"))
        logp[:, END_ID] = end
    return logp


@torch.no_grad()
def greedy_search(decoder, features, max_length=20, length_alpha=0.7):
    """Most likely word at each step. Returns per image [(token ids, log-prob, normalised
    score)], scored like beam_search so that the two are interchangeable."""
    n = features.size(0)
    state = decoder.init_state(features)
    tokens = torch.full((n,), START_ID, dtype=torch.long, device=features.device)
    finished = torch.zeros(n, dtype=torch.bool, device=features.device)
    log_prob = torch.zeros(n, device=features.device)
    history = []
    for t in range(max_length + 1):
        logp, state = decoder.step(tokens, state)
        logp = _mask_logprobs(logp, t, max_length)
        best, tokens = logp.max(dim=-1)
        log_prob += torch.where(finished, 0.0, best)
        tokens = tokens.masked_fill(finished, PAD_ID)
        history.append(tokens)
        finished |= tokens == END_ID
        if finished.all():
            break
    history = torch.stack(history, 1)
    lengths = (history != PAD_ID).sum(1).clamp(min=1).float()
    normalised = log_prob / lengths ** length_alpha
    return [[(_strip(h), lp, s)] for h, lp, s in zip(history.tolist(), log_prob.tolist(), normalised.tolist())]


@torch.no_grad()
def beam_search(decoder, features, beam_size=3, max_length=20, n_best=1, length_alpha=0.7):
    """Beam search over all images and beams at once: every step is one batched decoder
    call on B*K rows. Finished beams keep their score and continue with <PAD> for free.
    Hypotheses are ranked by log-prob / length**length_alpha (length counts <END>), so
    longer captions are not penalised just for having more words.

    Returns per image up to `n_best` [(token ids, log-prob, normalised score)], best first.
    """
    B, K, device = features.size(0), beam_size, features.device
    V = decoder.config.vocab_size
    state = decoder.init_state(features.repeat_interleave(K, dim=0))
    tokens = torch.full((B * K,), START_ID, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive or topk picks duplicates
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    history = torch.empty(B * K, 0, dtype=torch.long, device=device)
    offsets = (torch.arange(B, device=device) * K).unsqueeze(1)
    for t in range(max_length + 1):
        logp, state = decoder.step(tokens, state)
        logp = _mask_logprobs(logp, t, max_length)
        logp[finished] = float("-inf")
        logp[finished, PAD_ID] = 0.0
        candidates = (scores.view(-1, 1) + logp).view(B, K * V)
        scores, index = candidates.topk(K, dim=1)
        rows = (offsets + index // V).view(-1)
        tokens = (index % V).view(-1)
        state = reorder_state(state, rows)
        history = torch.cat([history[rows], tokens.unsqueeze(1)], dim=1)
        finished = finished[rows] | (tokens == END_ID)
        if finished.all():
            break
    lengths = (history != PAD_ID).sum(1).clamp(min=1).view(B, K).float()
    normalised = scores / lengths ** length_alpha
    history, scores, normalised = history.view(B, K, -1).tolist(), scores.tolist(), normalised.tolist()
    results = []
    for b in range(B):
        order = sorted(range(K), key=lambda k: -normalised[b][k])
        hyps = [(_strip(history[b][k]), scores[b][k], normalised[b][k]) for k in order
                if scores[b][k] > float("-inf")]
        results.append(hyps[:n_best])
    return results


def _strip(ids):
    """Token ids up to (not including) <END>, without padding."""
    out = []
    for i in ids:
        if i == END_ID:
            break
        if i != PAD_ID:
            out.append(i)
    return out
