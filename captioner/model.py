"""Show-and-Tell captioning model: a CNN feature vector initialises the state of a
recurrent decoder (LSTM by default, GRU or plain RNN by choice), which then emits words
from <START> until <END>. Greedy and (constrained) beam search decoding live here too.

With `attention` (Show, Attend and Tell; the default for new models) the decoder also reads
the encoder's spatial map, 7x7 positions of 1280 channels whose mean is the pooled vector:
before every word the last hidden state scores each position, the softmax of the scores
weights the positions' values into a context vector, a sigmoid gate of the hidden state
scales it (SAT's beta), and it goes into the recurrent cell beside the word. The pooled
vector still sets the initial state. The weights per position are what the API and the
page show as attention maps.

A decoder may also take a concept vector: the probabilities of the caption words that
the encoder's ImageNet classifier vouches for (`concepts.py`). It shifts the initial
state and is added to every input word, so that the model knows how sentences about a
"broccoli" or a "refrigerator" go even though no training photo showed one: text-only
captions supply the vector from their own words (see train.py).
"""
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .concepts import shipped_concepts
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
    num_concepts: int = 0  # size of the concept vector input; 0 = plain Show and Tell
    attention: bool = False  # soft attention over the spatial map (a checkpoint without the field has none)
    attention_dim: int = 512  # width of the attention scorer's hidden layer

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, not {self.cell!r}")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")

    def to_dict(self):
        return asdict(self)


class DecoderContext(NamedTuple):
    """What the decoder reads at every step besides its last word and state, per image;
    fields are None where the model has no such input."""
    words: torch.Tensor | None  # (B, E) added to every input word: the concepts
    keys: torch.Tensor | None  # (B, P, A) the spatial map's positions, projected for scoring
    values: torch.Tensor | None  # (B, P, E) the same positions, projected for the context vector

    def rows(self, index):
        """The context of the images `index` (one per hypothesis row of a search)."""
        return DecoderContext(*(None if t is None else t.index_select(0, index) for t in self))


def top_hidden(state):
    """(N, H): the last layer's hidden state, from an RNN state (L, N, H) or an LSTM's pair."""
    return (state[0] if isinstance(state, tuple) else state)[-1]


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
        # With attention the cell reads the word and the (embed_dim) context vector side by side.
        self.rnn = CELLS[c.cell](c.embed_dim * (2 if c.attention else 1), c.hidden_dim, c.num_layers,
                                 batch_first=True, dropout=c.dropout if c.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.hidden_dim, c.vocab_size)
        if c.num_concepts:
            self.concept_h = nn.Linear(c.num_concepts, state_size, bias=False)
            self.concept_c = nn.Linear(c.num_concepts, state_size, bias=False) if c.cell == "lstm" else None
            self.concept_in = nn.Linear(c.num_concepts, c.embed_dim, bias=False)
        if c.attention:
            self.map_norm = nn.LayerNorm(c.feature_dim)
            self.att_key = nn.Linear(c.feature_dim, c.attention_dim)
            self.att_value = nn.Linear(c.feature_dim, c.embed_dim)
            self.att_query = nn.Linear(c.hidden_dim, c.attention_dim)
            self.att_score = nn.Linear(c.attention_dim, 1)
            self.att_gate = nn.Linear(c.hidden_dim, c.embed_dim)

    def init_state(self, features, concepts=None):
        """(B, feature_dim) image features [+ (B, num_concepts)] -> the RNN's initial state."""
        f = self.dropout(self.feature_norm(features))
        L, H = self.config.num_layers, self.config.hidden_dim

        def layers(x):  # (B, L*H) -> (L, B, H), the layout torch's RNNs expect
            return torch.tanh(x).view(-1, L, H).transpose(0, 1).contiguous()

        h, c = self.init_h(f), self.init_c(f) if self.init_c is not None else None
        if self.config.num_concepts:
            h = h + self.concept_h(concepts)
            c = c + self.concept_c(concepts) if c is not None else None
        return (layers(h), layers(c)) if c is not None else layers(h)

    def context(self, concepts=None, spatial=None):
        """The per-image inputs of every step, computed once: (B, num_concepts) concepts and
        (B, P, feature_dim) spatial maps -> a DecoderContext, or None for a decoder with
        neither."""
        c = self.config
        if not c.num_concepts and not c.attention:
            return None
        words = self.concept_in(concepts) if c.num_concepts and concepts is not None else None
        keys = values = None
        if c.attention:
            if spatial is None:
                raise ValueError("this model attends over the spatial map: pass the encoder's spatial features")
            maps = self.map_norm(spatial.float())  # (B, P, D); stored maps may be fp16
            keys, values = self.att_key(maps), self.att_value(maps)  # (B, P, A), (B, P, E)
        return DecoderContext(words, keys, values)

    def attend(self, hidden, context):
        """Soft attention: hidden (N, H) and the rows' context -> the gated context vector
        (N, E) and the weights over the positions (N, P), which sum to 1."""
        query = self.att_query(hidden).unsqueeze(1)  # (N, 1, A)
        weights = self.att_score(torch.tanh(context.keys + query)).squeeze(2).softmax(dim=1)  # (N, P)
        attended = torch.bmm(weights.unsqueeze(1), context.values).squeeze(1)  # (N, E)
        return attended * torch.sigmoid(self.att_gate(hidden)), weights

    def forward(self, features, tokens, concepts=None, spatial=None):
        """Teacher forcing: logits (B, T, V) for predicting tokens[:, 1:] from tokens[:, :-1]
        is done by the caller; here `tokens` are the inputs."""
        return self.unroll(features, tokens, concepts, spatial)[0]

    def unroll(self, features, tokens, concepts=None, spatial=None):
        """forward, and the attention weights of every step (B, T, P) (None without attention)."""
        x = self.embed(tokens)  # (B, T, E)
        context = self.context(concepts, spatial)
        if context is not None and context.words is not None:
            x = x + context.words.unsqueeze(1)
        state = self.init_state(features, concepts)
        if not self.config.attention:  # one fused call over the whole sequence
            out, _ = self.rnn(self.dropout(x), state)
            return self.out(self.dropout(out)), None
        outs, weights = [], []
        for t in range(x.size(1)):  # the context depends on the previous step's state
            attended, w = self.attend(top_hidden(state), context)
            out, state = self._advance(self.dropout(torch.cat([x[:, t], attended], dim=1)), state)
            outs.append(out)
            weights.append(w)
        return self.out(self.dropout(torch.stack(outs, 1))), torch.stack(weights, 1)

    def step(self, tokens, state, context=None):
        """One decoding step: tokens (N,) and the rows' context -> log-probabilities (N, V)
        and the new state."""
        x = self.embed(tokens)
        if context is not None and context.words is not None:
            x = x + context.words
        if self.config.attention:
            x = torch.cat([x, self.attend(top_hidden(state), context)[0]], dim=1)
        out, state = self._advance(x, state)
        return F.log_softmax(self.out(out).float(), dim=-1), state

    def _advance(self, x, state):
        """The recurrent cell on one step's input x (N, in) -> output (N, H), new state."""
        if type(self.rnn) is nn.LSTM and x.device.type == "cpu" and not self.training:
            return self._lstm_step(x, state)
        out, state = self.rnn(x.unsqueeze(1), state)
        return out.squeeze(1), state

    def _lstm_step(self, x, state):
        """One time step of the LSTM, layer by layer with torch.lstm_cell: the same gates and
        weights as nn.LSTM (equal to torch's own CPU kernel bit for bit, to oneDNN's to ~1e-6).
        nn.LSTM on a CPU runs oneDNN's RNN primitive, whose set-up on every call (~1 ms for
        the shipped 512-unit layer) costs more than the step itself when a beam search has
        few live rows. x (N, E), state a pair of (L, N, H) -> output (N, H), new state."""
        h, c = state
        hs, cs = [], []
        for layer, weights in enumerate(self.rnn.all_weights):  # [w_ih, w_hh, b_ih, b_hh] per layer
            x, c_layer = torch.lstm_cell(x, (h[layer], c[layer]), *weights)  # eval: no dropout between layers
            hs.append(x)
            cs.append(c_layer)
        return x, (torch.stack(hs), torch.stack(cs))


def reorder_state(state, index):
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)


class CaptionModel(nn.Module):
    """Encoder + decoder. The encoder is frozen unless training fine-tunes it."""

    def __init__(self, config: ModelConfig, pretrained_encoder=True, concepts=None):
        super().__init__()
        self.config = config
        self.encoder = load_encoder(config.encoder, pretrained=pretrained_encoder).requires_grad_(False)
        self.encoder_tuned = False  # set by training with --fine-tune-encoder; saved with the weights
        self.decoder = CaptionDecoder(config)
        self.concepts = concepts or shipped_concepts()  # a ConceptMap; saved with the weights
        # Fitted after training by `captioner calibrate` (evidence.py); saved with the weights.
        self.person_head = None  # an evidence.PersonHead: P(someone is in the photo)
        self.calibration = None  # an evidence.Calibration: a caption's confidence
        if config.num_concepts not in (0, len(self.concepts)):
            raise ValueError(f"the decoder takes {config.num_concepts} concepts but the concept map has "
                             f"{len(self.concepts)}")

    def encode_images(self, pixels):
        """(B, 3, H, W) normalised pixels -> (pooled (B, D), spatial (B, P, D)) features."""
        return self.encoder.forward_maps(pixels.contiguous(memory_format=torch.channels_last))

    def classify_features(self, features):
        """(B, feature_dim) pooled features -> (B, 1000) ImageNet logits: the encoder's own
        classifier, on the feature the decoder gets anyway."""
        return self.encoder._fc(features.float())

    def decoder_concepts(self, class_logits):
        """The decoder's concept input for images, or None for a plain decoder."""
        return self.concepts.concept_probs(class_logits) if self.config.num_concepts else None

    def forward(self, pixels, tokens):
        features, spatial = self.encode_images(pixels)
        concepts = self.decoder_concepts(self.classify_features(features))
        return self.decoder(features, tokens, concepts, spatial)


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
def greedy_search(decoder, features, max_length=20, length_alpha=0.7, concepts=None, spatial=None):
    """Most likely word at each step. Returns per image [(token ids, log-prob, normalised
    score)], scored like beam_search so that the two are interchangeable."""
    n = features.size(0)
    state = decoder.init_state(features, concepts)
    context = decoder.context(concepts, spatial)
    tokens = torch.full((n,), START_ID, dtype=torch.long, device=features.device)
    finished = torch.zeros(n, dtype=torch.bool, device=features.device)
    log_prob = torch.zeros(n, device=features.device)
    history = []
    for t in range(max_length + 1):
        logp, state = decoder.step(tokens, state, context)
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
    return [[(_strip(h), lp, s)] for h, lp, s in zip(history.tolist(), log_prob.tolist(), normalised.tolist(),
                                                     strict=True)]


class RepeatRules(NamedTuple):
    """What block_repeats forbids, as (V,) bool masks over the vocabulary."""
    no_end_after: torch.Tensor  # words a caption may not end on ("a", "with", "of" ...)
    objects: torch.Tensor  # words never said twice after the same word ("a cat ... on a cat")


def block_repeats(logp, history, tokens, step, max_length, rules):
    """Forbid the loops a decoder falls into: the previous word again ("a dog dog"), a word
    that would repeat a trigram already said ("a white shirt and a white shirt"), an object
    after the same word again ("a cat is sitting on top of a cat"), and ending right after
    a word that needs more. logp (n, V) next-word log-probs of n hypotheses, history (n, t)
    their words so far (None at step 0), tokens (n,) their last word, rules a RepeatRules.
    -> logp, changed in place."""
    if step == 0:
        return logp
    rows = torch.arange(logp.size(0), device=logp.device)
    logp[rows, tokens] = float("-inf")
    if step < max_length:  # at max_length <END> is the only word left: never take it away
        logp[rules.no_end_after[tokens], END_ID] = float("-inf")
    if history.size(1) >= 2:
        # Earlier positions j where the last word stood too: the object after it (at j + 1)
        # would be said again after the same word.
        r, j = (history[:, :-1] == history[:, -1:]).nonzero(as_tuple=True)  # (n, t-1) matches
        after = history[:, 1:][r, j]
        keep = rules.objects[after]
        logp[r[keep], after[keep]] = float("-inf")
    if history.size(1) >= 3:
        # Earlier positions j where the last two words stood too: the word after them (at
        # j + 2) would repeat that trigram.
        match = (history[:, :-2] == history[:, -2:-1]) & (history[:, 1:-1] == history[:, -1:])  # (n, t-2)
        r, j = match.nonzero(as_tuple=True)
        logp[r, history[:, 2:][r, j]] = float("-inf")
    return logp


@torch.inference_mode()
def beam_search(decoder, features, beam_size=3, max_length=20, n_best=1, length_alpha=0.7, concepts=None,
                constraints=None, banned=None, repeat_rules=None, spatial=None):
    """Beam search over all images and beams at once: every step is one batched decoder
    call. Finished beams keep their score and continue with <PAD> for free. Hypotheses
    are ranked by log-prob / length**length_alpha (length counts <END>), so longer
    captions are not penalised just for having more words.

    `constraints`, per image a list of sets of word ids, makes it constrained beam search
    (Anderson et al. 2017): the caption must contain a word of every set ("cat" or
    "kitten"). Each image keeps a beam of `beam_size` hypotheses for every subset of the
    constraints met so far (S = 2**M states for M constraints), a word moves a hypothesis
    to the state that adds the sets the word belongs to, and the answer comes from the
    state where all are met. With no constraints S = 1 and this is plain beam search.

    Only live hypotheses (not finished, score > -inf) go through the decoder: the others
    can only go on with <PAD> for free, or not at all, whatever the decoder says. An image
    with no live hypothesis left is final and leaves the batch. This is the search that
    runs every beam of every image to the end, up to float rounding (a matrix product
    over fewer rows may round its last bit differently).

    `banned` (B, V): 0, or -inf for the words an image's caption may not use (evidence.py);
    `repeat_rules` (a RepeatRules) turns on block_repeats; `spatial` (B, P, D): the maps an
    attention decoder reads.

    Returns per image up to `n_best` [(token ids, log-prob, normalised score)], best first.

    One function on purpose: the constrained states, the shrinking batch and the row
    bookkeeping share their index tensors step by step, and split apart they would have to
    pass a dozen of them back and forth.
    """
    B, K, device = features.size(0), beam_size, features.device
    V = decoder.config.vocab_size
    M = max((len(c) for c in constraints), default=0) if constraints else 0
    S = 1 << M
    SK = S * K  # hypothesis slots per image: row b * SK + s * K + k is image b, state s, beam k
    # word_bits[b, w]: the constraints of image b that word w meets, as bits; an image
    # with fewer than M constraints starts with the missing ones already met.
    word_bits = torch.zeros(B, V, dtype=torch.long)
    start = torch.zeros(B, dtype=torch.long)
    for b, sets in enumerate(constraints or []):
        for m in range(M):
            if m < len(sets) and sets[m]:
                word_bits[b, sorted(sets[m])] |= 1 << m
            else:
                start[b] |= 1 << m
    word_bits, start = word_bits.to(device), start.to(device)
    target = torch.arange(S, device=device).view(1, S, 1) | word_bits.view(B, 1, V)  # (B, S, V) next state
    # lands[b, s, r, 0, w]: 0 where word w takes a hypothesis of image b from state r to state s,
    # else -inf. Added to the candidates it keeps those that land in s: the same values as a
    # masked_fill with the broadcast bool mask, which costs several adds.
    lands = torch.where(target.unsqueeze(1) == torch.arange(S, device=device).view(1, S, 1, 1), 0.0,
                        float("-inf")).unsqueeze(3) if S > 1 else None  # (B, S, S, 1, V)

    # The batch shrinks as images finish: `image` maps its rows to the caller's images.
    image = torch.arange(B, device=device)  # (A,) for the A images still searching
    scores = torch.full((B, S, K), float("-inf"), device=device)  # (A, S, K)
    # All beams start identical: keep one alive, in the image's start state, or topk picks duplicates.
    scores[image, start, 0] = 0.0
    finished = torch.zeros(B * SK, dtype=torch.bool, device=device)  # (A*SK,)
    history = torch.empty(B * SK, 0, dtype=torch.long, device=device)  # (A*SK, t)
    # The live rows, and the decoder's state and last word for each of them (one per image
    # at first: the start state is the image's, whatever beam it is on).
    live = image * SK + start * K  # (n,) into the A*SK rows
    state = decoder.init_state(features, concepts)  # (L, n, H), for an LSTM a pair
    context = decoder.context(concepts, spatial)  # per image, not per row
    tokens = torch.full((B,), START_ID, dtype=torch.long, device=device)  # (n,)
    # What the finished images end with, in the caller's order.
    final_scores = torch.empty(B, S, K, device=device)
    final_lengths = torch.empty(B, S, K, device=device)
    final_history = [None] * B
    rows_context, rows_of = None, None  # the context of each live row, remade only when the rows change
    for t in range(max_length + 1):
        A = image.size(0)
        if context is not None and (rows_of is None or not torch.equal(rows_of, image[live // SK])):
            rows_of = image[live // SK]
            rows_context = context.rows(rows_of)  # (n, P, ...): a copy of the maps' projections per row
        logp, state = decoder.step(tokens, state, rows_context)
        logp = _mask_logprobs(logp, t, max_length)  # (n, V)
        if banned is not None:
            logp += banned[image[live // SK]]
        if repeat_rules is not None:
            logp = block_repeats(logp, history[live] if t else None, tokens, t, max_length, repeat_rules)
        # Every row's next-word log-probs: a finished hypothesis may only add <PAD>, for
        # free; one that was never reached (score -inf) stays out of reach whatever it adds.
        step_logp = logp.new_full((A * SK, V), float("-inf"))
        step_logp[finished, PAD_ID] = 0.0
        step_logp[live] = logp
        candidates = scores.view(A, S, K, 1) + step_logp.view(A, S, K, V)  # (A, S, K, V)
        if S == 1:
            scores, index = candidates.view(A, 1, K * V).topk(K, dim=2)  # (A, 1, K)
        else:  # the best K of the candidates that land in each state
            per_state = [(candidates + lands[:, s]).view(A, SK * V).topk(K, dim=1) for s in range(S)]
            scores = torch.stack([sc for sc, _ in per_state], 1)  # (A, S, K)
            index = torch.stack([ix for _, ix in per_state], 1)  # (A, S, K) into S*K*V
        rows = (torch.arange(A, device=device).view(A, 1, 1) * SK + index // V).view(-1)  # (A*SK,) parent rows
        words = (index % V).view(-1)  # (A*SK,)
        history = torch.cat([history[rows], words.unsqueeze(1)], dim=1)
        finished = finished[rows] | (words == END_ID)
        alive = ~finished & (scores.view(-1) > float("-inf"))  # (A*SK,)
        # A live hypothesis has a live parent (a finished or unreached one has no finite
        # continuation but <PAD>): its state is that parent's, at the parent's place in `live`.
        place = torch.full((A * SK,), -1, dtype=torch.long, device=device)
        place[live] = torch.arange(live.size(0), device=device)
        state = reorder_state(state, place[rows[alive]])
        # Images with no live hypothesis are final (the full search would only add <PAD>s).
        done = ~alive.view(A, SK).any(dim=1)  # (A,)
        if done.any():
            gone, ended = image[done], history.view(A, S, K, -1)[done]  # (D,), (D, S, K, t)
            final_scores[gone] = scores[done]
            final_lengths[gone] = (ended != PAD_ID).sum(-1).clamp(min=1).float()
            for b, h in zip(gone.tolist(), ended.tolist(), strict=True):
                final_history[b] = h
            keep = ~done
            image, scores = image[keep], scores[keep]
            lands = lands[keep] if lands is not None else None
            history = history.view(A, SK, -1)[keep].view(-1, history.size(1))
            finished, alive = finished.view(A, SK)[keep].view(-1), alive.view(A, SK)[keep].view(-1)
            words = words.view(A, SK)[keep].view(-1)
            if image.numel() == 0:
                break
        live = alive.nonzero().squeeze(1)  # same order as the rows of `state`
        tokens = words[live]
    # At step max_length every live hypothesis had to say <END>, so every image is final.
    normalised = final_scores / final_lengths ** length_alpha
    scores, normalised = final_scores.tolist(), normalised.tolist()
    # States with more constraints met first: the full state, else the best that was reached.
    state_order = sorted(range(S), key=lambda s: -bin(s).count("1"))
    results = []
    for b in range(B):
        hyps = []
        for s in state_order:
            hyps = [(_strip(final_history[b][s][k]), scores[b][s][k], normalised[b][s][k]) for k in range(K)
                    if scores[b][s][k] > float("-inf")]
            if hyps:
                break
        hyps.sort(key=lambda h: -h[2])
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
