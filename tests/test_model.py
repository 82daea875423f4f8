"""The Show-and-Tell decoder and its greedy and beam search."""
import math

import pytest
import torch
from conftest import PHOTO_CAPTIONS, sequence_log_prob, train_decoder
from conftest import SYNTHETIC_CAPTIONS as CAPTIONS

from captioner.inference import decode_features
from captioner.model import (BANNED_IDS, CaptionDecoder, CaptionModel, DecoderContext, ModelConfig, beam_search,
                             greedy_search)
from captioner.options import DecodeOptions
from captioner.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary


@pytest.fixture(scope="module")
def random_decoder():
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=30, feature_dim=16, embed_dim=16, hidden_dim=32, dropout=0.0)
    return CaptionDecoder(config).eval()


def _copy(decoder):
    clone = CaptionDecoder(decoder.config).eval()
    clone.load_state_dict(decoder.state_dict())
    return clone


def test_trained_decoder_says_its_captions_and_stops(synthetic):
    decoder, vocab, features = synthetic
    greedy = greedy_search(decoder, features, max_length=20)
    beam = beam_search(decoder, features, beam_size=3, max_length=20)
    assert [vocab.decode(h[0][0]) for h in greedy] == CAPTIONS
    assert [vocab.decode(h[0][0]) for h in beam] == CAPTIONS
    # It stopped because it chose <END>, not because it ran out of room (max_length 20),
    # and the reported log-prob is that of the caption followed by <END>.
    for f, hyps in zip(features, beam, strict=True):
        ids, log_prob, score = hyps[0]
        assert len(ids) < 20
        assert log_prob == pytest.approx(sequence_log_prob(decoder, f, ids), abs=1e-4)
        assert log_prob > math.log(0.5)  # a confident model
        assert score == pytest.approx(log_prob / (len(ids) + 1) ** 0.7, abs=1e-5)


@pytest.mark.parametrize("cell,layers", [("gru", 2), ("rnn", 1)])
def test_other_cells_learn_too(cell, layers):
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    features = torch.randn(len(CAPTIONS), 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(vocab), feature_dim=16, embed_dim=32, hidden_dim=64, num_layers=layers,
                         cell=cell, dropout=0.0)
    decoder = train_decoder(CaptionDecoder(config), features, CAPTIONS, vocab, steps=150)
    assert [vocab.decode(h[0][0]) for h in beam_search(decoder, features, beam_size=2)] == CAPTIONS


def test_greedy_equals_beam_size_one(synthetic, random_decoder):
    for decoder, dim in ((random_decoder, 16), (synthetic[0], 16)):
        features = torch.randn(6, dim, generator=torch.Generator().manual_seed(2))
        greedy = greedy_search(decoder, features, max_length=12)
        beam = beam_search(decoder, features, beam_size=1, max_length=12)
        assert len(greedy) == len(beam) == 6
        for (g,), (b,) in zip(greedy, beam, strict=True):
            assert g[0] == b[0]  # same tokens
            assert g[1] == pytest.approx(b[1], abs=1e-4)  # same log-prob
            assert g[2] == pytest.approx(b[2], abs=1e-4)  # same normalised score


def test_beam_search_n_best_sorted_distinct_and_batched(random_decoder):
    features = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    results = beam_search(random_decoder, features, beam_size=5, n_best=5, max_length=10)
    assert len(results) == 4
    for f, image in zip(features, results, strict=True):
        assert len(image) == 5
        scores = [s for _, _, s in image]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(ids) for ids, _, _ in image}) == 5
        for ids, log_prob, score in image:
            assert 1 <= len(ids) <= 10 and log_prob < 0
            assert not set(ids) & {PAD_ID, START_ID, END_ID, UNK_ID}
            if len(ids) < 10:  # ended by choice: the log-prob is the sequence's, <END> included
                assert log_prob == pytest.approx(sequence_log_prob(random_decoder, f, ids), abs=1e-4)
    # n_best=2 gives the first two of the same search; an image alone gets what it got in the batch.
    top2 = beam_search(random_decoder, features, beam_size=5, n_best=2, max_length=10)
    assert [[h[0] for h in r] for r in top2] == [[h[0] for h in r[:2]] for r in results]
    alone = beam_search(random_decoder, features[2:3], beam_size=5, n_best=5, max_length=10)
    assert [ids for ids, _, _ in alone[0]] == [ids for ids, _, _ in results[2]]


def test_unk_never_emitted_even_when_preferred(random_decoder):
    decoder = _copy(random_decoder)
    with torch.no_grad():
        decoder.out.bias[UNK_ID] = 100.0  # the model wants <UNK> at every step
        decoder.out.bias[PAD_ID] = 90.0
        decoder.out.bias[START_ID] = 80.0
    features = torch.randn(3, 16)
    results = beam_search(decoder, features, beam_size=4, n_best=4, max_length=7) + \
        greedy_search(decoder, features, max_length=7)
    for hyps in results:
        for ids, log_prob, _ in hyps:
            assert not set(ids) & set(BANNED_IDS)
            assert 1 <= len(ids) <= 7 and math.isfinite(log_prob)


def test_max_length_respected(random_decoder):
    decoder = _copy(random_decoder)
    with torch.no_grad():
        decoder.out.bias[END_ID] = -100.0  # never wants to stop
    features = torch.randn(3, 16)
    for max_length in (1, 5):
        for hyps in beam_search(decoder, features, beam_size=3, n_best=3, max_length=max_length) + \
                greedy_search(decoder, features, max_length=max_length):
            assert [len(ids) for ids, _, _ in hyps] == [max_length] * len(hyps)


def test_at_least_one_word(random_decoder):
    decoder = _copy(random_decoder)
    with torch.no_grad():
        decoder.out.bias[END_ID] = 100.0  # wants to stop straight away
    features = torch.randn(3, 16)
    for hyps in beam_search(decoder, features, beam_size=3, n_best=3) + greedy_search(decoder, features):
        assert all(len(ids) == 1 for ids, _, _ in hyps)


def test_beam_wider_than_vocabulary():
    vocab = Vocabulary.build(["dog cat"], min_count=1)  # two words: fewer choices than beams
    torch.manual_seed(0)
    decoder = CaptionDecoder(ModelConfig(vocab_size=len(vocab), feature_dim=8, embed_dim=8, hidden_dim=8,
                                         dropout=0.0)).eval()
    hyps = beam_search(decoder, torch.randn(2, 8), beam_size=5, n_best=5, max_length=3)
    for image in hyps:
        assert image and all(math.isfinite(lp) and set(ids) <= {4, 5} for ids, lp, _ in image)
        assert len({tuple(ids) for ids, _, _ in image}) == len(image)


def test_decode_features_result_shape_and_validation(trained_model, tiny_vocab, photo_features):
    results = decode_features(trained_model, tiny_vocab, photo_features, DecodeOptions(beam_size=3, n_best=3))
    assert [r["caption"] for r in results] == list(PHOTO_CAPTIONS.values())
    for r in results:
        assert set(r) == {"caption", "score", "log_prob", "confidence", "alternatives", "objects"}
        assert len(r["alternatives"]) == 2 and r["confidence"] is None  # the tiny model has no calibration
        assert all(r["score"] >= a["score"] for a in r["alternatives"])
    greedy = decode_features(trained_model, tiny_vocab, photo_features, DecodeOptions(beam_size=1))
    assert greedy[0]["alternatives"] == []
    for kwargs in ({"beam_size": 0}, {"beam_size": 11}, {"beam_size": 2, "n_best": 3}, {"max_length": 0}):
        with pytest.raises(ValueError):
            DecodeOptions(**kwargs)


def test_decoder_shapes_and_state_layout():
    for cell, layers in (("lstm", 2), ("gru", 3), ("rnn", 1)):
        config = ModelConfig(vocab_size=11, feature_dim=6, embed_dim=5, hidden_dim=7, num_layers=layers, cell=cell)
        decoder = CaptionDecoder(config).eval()
        state = decoder.init_state(torch.randn(4, 6))
        h = state[0] if cell == "lstm" else state
        assert h.shape == (layers, 4, 7)
        assert decoder(torch.randn(4, 6), torch.ones(4, 9, dtype=torch.long)).shape == (4, 9, 11)
        logp, _ = decoder.step(torch.ones(4, dtype=torch.long), state)
        assert logp.shape == (4, 11) and torch.allclose(logp.exp().sum(-1), torch.ones(4))


def test_config_validation():
    with pytest.raises(ValueError, match="cell"):
        ModelConfig(vocab_size=10, cell="transformer")
    with pytest.raises(ValueError, match="num_layers"):
        ModelConfig(vocab_size=10, num_layers=0)
    config = ModelConfig(vocab_size=10, embed_dim=4, hidden_dim=4)
    assert ModelConfig(**config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown encoder"):
        CaptionModel(ModelConfig(vocab_size=10, encoder="resnet50"), pretrained_encoder=False)


def test_caption_model_encoder_is_frozen(tiny_model):
    assert not any(p.requires_grad for p in tiny_model.encoder.parameters())
    assert all(p.requires_grad for p in tiny_model.decoder.parameters())
    assert tiny_model.encoder_tuned is False


# ---------------------------------------------------------------- the shipped model's beam search
# beam_search leaves finished hypotheses and images out of its decoder steps, and steps the
# LSTM with torch.lstm_cell. `reference_beam_search` is the search before that (every row
# of every image to the end, nn.LSTM): the two must agree on the shipped weights.

def _reference_step(decoder, tokens, state, context=None):
    from captioner.model import top_hidden

    x = decoder.embed(tokens)
    if context is not None and context.words is not None:
        x = x + context.words
    if decoder.config.attention:
        x = torch.cat([x, decoder.attend(top_hidden(state), context)[0]], dim=1)
    out, state = decoder.rnn(x.unsqueeze(1), state)
    return torch.log_softmax(decoder.out(out.squeeze(1)).float(), dim=-1), state


@torch.no_grad()
def reference_beam_search(decoder, features, beam_size=3, max_length=20, n_best=1, length_alpha=0.7,
                          concepts=None, constraints=None, banned=None, repeat_rules=None, spatial=None):
    from captioner.model import _mask_logprobs, _strip, block_repeats, reorder_state

    B, K, V = features.size(0), beam_size, decoder.config.vocab_size
    M = max((len(c) for c in constraints), default=0) if constraints else 0
    S = 1 << M
    word_bits = torch.zeros(B, V, dtype=torch.long)
    start = torch.zeros(B, dtype=torch.long)
    for b, sets in enumerate(constraints or []):
        for m in range(M):
            if m < len(sets) and sets[m]:
                word_bits[b, sorted(sets[m])] |= 1 << m
            else:
                start[b] |= 1 << m
    target = torch.arange(S).view(1, S, 1) | word_bits.view(B, 1, V)
    def per_row(x):  # (B, ...) -> (B*S*K, ...)
        return x.repeat_interleave(S * K, dim=0)

    state = decoder.init_state(per_row(features), per_row(concepts) if concepts is not None else None)
    context = decoder.context(per_row(concepts) if concepts is not None else None,
                              per_row(spatial) if spatial is not None else None)
    tokens = torch.full((B * S * K,), START_ID, dtype=torch.long)
    scores = torch.full((B, S, K), float("-inf"))
    scores[torch.arange(B), start, 0] = 0.0
    finished = torch.zeros(B * S * K, dtype=torch.bool)
    history = torch.empty(B * S * K, 0, dtype=torch.long)
    offsets = (torch.arange(B) * S * K).view(B, 1, 1)
    for t in range(max_length + 1):
        logp, state = _reference_step(decoder, tokens, state, context)
        logp = _mask_logprobs(logp, t, max_length)
        if banned is not None:
            logp += per_row(banned)
        if repeat_rules is not None:
            logp = block_repeats(logp, history if t else None, tokens, t, max_length, repeat_rules)
        logp[finished] = float("-inf")
        logp[finished, PAD_ID] = 0.0
        candidates = scores.view(B, S, K, 1) + logp.view(B, S, K, V)
        if S == 1:
            scores, index = candidates.view(B, 1, K * V).topk(K, dim=2)
        else:
            per_state = [candidates.masked_fill((target != s).unsqueeze(2), float("-inf")).view(B, S * K * V)
                         .topk(K, dim=1) for s in range(S)]
            scores = torch.stack([sc for sc, _ in per_state], 1)
            index = torch.stack([ix for _, ix in per_state], 1)
        rows = (offsets + index // V).view(-1)
        tokens = (index % V).view(-1)
        state = reorder_state(state, rows)
        history = torch.cat([history[rows], tokens.unsqueeze(1)], dim=1)
        finished = finished[rows] | (tokens == END_ID)
        if (finished | (scores.view(-1) == float("-inf"))).all():
            break
    lengths = (history != PAD_ID).sum(1).clamp(min=1).view(B, S, K).float()
    normalised = (scores / lengths ** length_alpha).tolist()
    history, scores = history.view(B, S, K, -1).tolist(), scores.tolist()
    results = []
    for b in range(B):
        hyps = []
        for s in sorted(range(S), key=lambda s: -bin(s).count("1")):
            hyps = [(_strip(history[b][s][k]), scores[b][s][k], normalised[b][s][k]) for k in range(K)
                    if scores[b][s][k] > float("-inf")]
            if hyps:
                break
        hyps.sort(key=lambda h: -h[2])
        results.append(hyps[:n_best])
    return results


@pytest.fixture(scope="module")
def shipped():
    """(shipped Captioner on the torch encoder, features (12, 1280) and maps (12, 49, 1280)
    of real photos): six of
    skimage's photos, whole and cropped, so that the images of a batch end at different steps.
    The tests using it run torch on one thread: the searches' small matrix products gain
    nothing from a second, and on a busy machine each of them would wait for it."""
    from PIL import Image
    from skimage import data

    from captioner.images import preprocess
    from captioner.inference import DEFAULT_WEIGHTS, Captioner

    captioner = Captioner.from_pretrained(DEFAULT_WEIGHTS, device="cpu", backend="torch")
    views = []
    for name in ("chelsea", "coffee", "rocket", "astronaut", "immunohistochemistry", "camera"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = img.size
        views += [img, img.crop((w // 3, h // 4, w, h))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield captioner, *captioner.encode_images(torch.stack([preprocess(v) for v in views]))
    torch.set_num_threads(threads)


def _same_hypotheses(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [ids for ids, _, _ in g] == [ids for ids, _, _ in w]
        assert [lp for _, lp, _ in g] == pytest.approx([lp for _, lp, _ in w], abs=1e-5)
        assert [s for _, _, s in g] == pytest.approx([s for _, _, s in w], abs=1e-5)


def test_beam_search_matches_the_full_search_on_the_shipped_model(shipped):
    captioner, features, spatial = shipped
    model, ids = captioner.model, captioner.vocab.stoi
    spatial = spatial if model.config.attention else None
    concepts = model.decoder_concepts(model.classify_features(features))
    # Constraints: one per image; and a mix of none, one and two (S = 4 states), disjunctive
    # sets among them, most of which the photo would never say unprompted.
    forced = [{ids["cat"], ids["cats"]}, {ids["dog"]}, {ids["man"], ids["woman"]}, {ids["water"]}, {ids["red"]}]
    one = [[forced[i % 5]] for i in range(len(features))]
    mixed = [[forced[i % 5], forced[(i + 2) % 5]][:i % 3] for i in range(len(features))]
    # Bans and repeat blocks too: people words banned for every other image, endings on "a".
    banned = torch.zeros(len(features), len(captioner.vocab))
    banned[::2, [ids["man"], ids["woman"], ids["people"]]] = float("-inf")
    from captioner.evidence import repeat_rules_for

    blocks = dict(banned=banned, repeat_rules=repeat_rules_for(captioner.vocab, features.device))
    for beam_size, n_best, max_length, constraints, extra in [
            (3, 1, 20, None, {}), (3, 3, 20, one, {}), (3, 2, 20, mixed, {}), (1, 1, 20, mixed, {}),
            (5, 5, 20, None, {}), (10, 2, 16, one, {}), (2, 2, 3, mixed, {}),  # max_length 3: all run out of room
            (3, 3, 20, None, blocks), (3, 2, 20, mixed, blocks), (2, 2, 4, one, blocks)]:
        kwargs = dict(beam_size=beam_size, n_best=n_best, max_length=max_length, concepts=concepts,
                      constraints=constraints, spatial=spatial, **extra)
        got = beam_search(model.decoder, features, **kwargs)
        _same_hypotheses(got, reference_beam_search(model.decoder, features, **kwargs))
        assert all(len(h) == n_best for h in got)


@pytest.mark.parametrize("options", [DecodeOptions(), DecodeOptions(grounding=False, beam_size=5, n_best=3),
                                     DecodeOptions(max_concepts=2, concept_threshold=0.05, beam_size=2, n_best=2)])
def test_decode_features_unchanged_on_the_shipped_model(shipped, options, monkeypatch):
    import captioner.inference as inference

    shipped_captioner, features, spatial = shipped
    model, vocab = shipped_captioner.model, shipped_captioner.vocab
    results = decode_features(model, vocab, features, options, spatial)
    monkeypatch.setattr(inference, "beam_search", reference_beam_search)
    want = decode_features(model, vocab, features, options, spatial)
    for r, w in zip(results, want, strict=True):  # scores are rounded to 4 decimals: allow one step
        assert [r["caption"], r["objects"]] == [w["caption"], w["objects"]]
        assert [a["caption"] for a in r["alternatives"]] == [a["caption"] for a in w["alternatives"]]
        assert [r["score"], r["log_prob"]] == pytest.approx([w["score"], w["log_prob"]], abs=1.5e-4)
    assert any(r["objects"] for r in results)


def test_lstm_step_equals_nn_lstm():
    for layers in (1, 2):
        torch.manual_seed(layers)
        decoder = CaptionDecoder(ModelConfig(vocab_size=30, feature_dim=16, embed_dim=16, hidden_dim=32,
                                             num_layers=layers)).eval()
        state = decoder.init_state(torch.randn(5, 16))
        tokens, context = torch.randint(4, 30, (5,)), DecoderContext(torch.randn(5, 16), None, None)
        with torch.no_grad():
            logp, (h, c) = decoder.step(tokens, state, context)
            want, (h_want, c_want) = _reference_step(decoder, tokens, state, context)
        assert h.shape == h_want.shape == (layers, 5, 32)
        assert torch.allclose(logp, want, atol=1e-5) and torch.allclose(h, h_want, atol=1e-6)
        assert torch.allclose(c, c_want, atol=1e-6)


# ---------------------------------------------------------------- attention

def _attention_decoder(cell="lstm", layers=1, concepts=0):
    from captioner.model import CaptionDecoder

    torch.manual_seed(0)
    return CaptionDecoder(ModelConfig(vocab_size=20, feature_dim=16, embed_dim=8, hidden_dim=12, num_layers=layers,
                                      cell=cell, dropout=0.0, attention=True, attention_dim=6,
                                      num_concepts=concepts)).eval()


@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("lstm", 2), ("gru", 1), ("rnn", 2)])
def test_attention_weights_sum_to_one_and_steps_equal_teacher_forcing(cell, layers):
    from captioner.model import top_hidden
    from captioner.vocab import START_ID

    decoder = _attention_decoder(cell, layers, concepts=5)
    g = torch.Generator().manual_seed(1)
    features, spatial, concepts = torch.randn(3, 16, generator=g), torch.randn(3, 49, 16, generator=g), \
        torch.rand(3, 5, generator=g)
    tokens = torch.randint(4, 20, (3, 7), generator=g)
    tokens[:, 0] = START_ID
    with torch.no_grad():
        logits, weights = decoder.unroll(features, tokens, concepts, spatial)
        assert weights.shape == (3, 7, 49) and (weights >= 0).all()
        assert torch.allclose(weights.sum(-1), torch.ones(3, 7))
        state, context = decoder.init_state(features, concepts), decoder.context(concepts, spatial)
        for t in range(7):  # the step the searches take equals teacher forcing, position by position
            assert torch.allclose(decoder.attend(top_hidden(state), context)[1], weights[:, t], atol=1e-6)
            logp, state = decoder.step(tokens[:, t], state, context)
            assert torch.allclose(logp, logits[:, t].log_softmax(-1), atol=1e-5)
        # The map is read: another map, other words (the same map in another order reads the
        # same: attention weighs positions by what they show, not where they are).
        assert not torch.allclose(decoder(features, tokens, concepts, torch.randn(3, 49, 16, generator=g)), logits)
        assert torch.allclose(decoder(features, tokens, concepts, spatial.flip(1)), logits, atol=1e-5)
    with pytest.raises(ValueError, match="spatial"):
        decoder(features, tokens, concepts)


def test_beam_search_with_attention_matches_the_full_search(attention_model, photo_features, photo_maps, tiny_vocab):
    ids = tiny_vocab.stoi
    one = [[{ids["cat"]}], [{ids["coffee"]}], [{ids["rocket"]}], [{ids["woman"]}]]
    mixed = [[], [{ids["cat"]}], [{ids["chair"]}, {ids["hot"]}], [{ids["space"], ids["suit"]}]]
    for extra in ({}, {"constraints": one}, {"constraints": mixed, "n_best": 2}, {"beam_size": 1, "constraints": mixed},
                  {"beam_size": 5, "n_best": 5, "max_length": 4}):
        kwargs = {"beam_size": 3, "max_length": 12, "spatial": photo_maps, **extra}
        got = beam_search(attention_model.decoder, photo_features, **kwargs)
        _same_hypotheses(got, reference_beam_search(attention_model.decoder, photo_features, **kwargs))


def test_decode_features_gives_the_attention_the_search_had_for_each_word(attention_model, tiny_vocab,
                                                                          photo_features, photo_maps):
    from captioner.model import top_hidden
    from captioner.vocab import START_ID

    results = decode_features(attention_model, tiny_vocab, photo_features, DecodeOptions(attention=True),
                              photo_maps)
    assert [r["caption"] for r in results] == list(PHOTO_CAPTIONS.values())
    decoder = attention_model.decoder
    for b, r in enumerate(results):
        assert [a["word"] for a in r["attention"]] == r["caption"].split()
        grids = torch.tensor([a["weights"] for a in r["attention"]])  # (words, 7, 7)
        assert grids.shape == (len(r["attention"]), 7, 7)
        assert torch.allclose(grids.sum((1, 2)), torch.ones(len(grids)), atol=1e-3)
        # Step by step along the caption: the weights at each word are those returned.
        state, context = decoder.init_state(photo_features[b:b + 1]), decoder.context(None, photo_maps[b:b + 1])
        token = START_ID
        for a in r["attention"]:
            weights = decoder.attend(top_hidden(state), context)[1]
            assert torch.allclose(weights.view(7, 7), torch.tensor(a["weights"]), atol=1e-4)
            _, state = decoder.step(torch.tensor([token]), state, context)
            token = tiny_vocab.stoi[a["word"]]
    plain = decode_features(attention_model, tiny_vocab, photo_features, DecodeOptions(), photo_maps)
    assert [p["caption"] for p in plain] == [r["caption"] for r in results] and "attention" not in plain[0]


def test_pooled_checkpoints_still_load_and_caption_but_have_no_maps(trained_captioner, attention_captioner, photos):
    assert not trained_captioner.model.config.attention and attention_captioner.model.config.attention
    assert trained_captioner.caption(photos["cat"])["caption"] == PHOTO_CAPTIONS["cat"]
    with pytest.raises(ValueError, match="attention maps need a model with attention"):
        trained_captioner.caption(photos["cat"], attention=True)
    result = attention_captioner.caption(photos["rocket"], attention=True)
    assert result["caption"] == PHOTO_CAPTIONS["rocket"] and len(result["attention"]) == 6
