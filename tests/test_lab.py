"""tutorial/lab.py, the instruments the chapters measure with, against numbers computed by hand: the
chapters print what these return, and no chapter output is compared, so a wrong measure would print a
wrong claim. A tiny random Llama (4 query heads over 2 KV heads) stands in for the default model."""
import math
from fractions import Fraction

import pytest
import torch

import infinigen as I
import model as M
from helpers import randomize
from tutorial import lab


@pytest.fixture(scope="module")
def tiny():
    cfg = M.Config(arch="llama", vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48,
                   max_seq_len=128)
    torch.manual_seed(0)
    return randomize(M.Transformer(cfg), 0).eval()


IDS = [int(i) for i in torch.randint(0, 64, (23,), generator=torch.Generator().manual_seed(1))]


def pasts(new):  # past tokens over `new` decode steps: step s reads len(IDS) + s
    return sum(len(IDS) + s for s in range(new))


@pytest.fixture(scope="module")
def rec(tiny):
    return lab.record(tiny, IDS, 5)


# --- Attention coverage
def test_tokens_for_mass_and_top_set():
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.1, 0.4, 0.2, 0.3]])     # sorted sums: .5 .8 .95, .4 .7 .9
    assert lab.tokens_for_mass(p, 0.45).tolist() == [1, 2]
    assert lab.tokens_for_mass(p, 0.75).tolist() == [2, 3]
    assert lab.tokens_for_mass(p, 0.92).tolist() == [3, 4]
    assert lab.top_set(p, 0.75).tolist() == [[False, True, False, True], [False, True, True, True]]


def test_kept_mass_splits_old_and_new():
    later = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])                       # t' = 5
    chosen = torch.tensor([True, False, True])                              # chosen among t = 3
    old, since = lab.kept_mass(later, chosen)
    assert old.item() == pytest.approx(0.4) and since.item() == pytest.approx(0.4)


# --- Recording and layer similarity
def test_the_recorder_sees_every_token_and_the_true_attention(tiny, rec):
    L, n = tiny.cfg.n_layers, len(IDS) + 5
    assert [rec.inputs(i).shape[0] for i in range(L)] == [n] * L and len(rec.p[0]) == 5
    for s, p in enumerate(rec.p[1]):                                        # decode step s: t + 1 keys
        t = len(IDS) + s
        assert p.shape == (4, t + 1) and torch.allclose(p.sum(-1), torch.ones(4))
        q, k = rec.queries(1)[t], rec.keys(1)[:t + 1]                       # (H, d), (t+1, Hkv, d)
        want = (q[:, None] * k.repeat_interleave(2, 1).transpose(0, 1)).sum(-1) / 8 ** 0.5   # d = 8
        assert torch.allclose(p, want.softmax(-1), atol=1e-6)


def test_cosine_next_compares_consecutive_layers(rec):
    got = lab.cosine_next(rec)
    want = [torch.nn.functional.cosine_similarity(rec.inputs(i), rec.inputs(i + 1), dim=-1).mean().item()
            for i in range(2)]
    assert got.tolist() == pytest.approx(want) and all(w < 0.999 for w in want)


# --- Score prediction
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5, 1.0])
def test_speculating_from_the_layers_own_input_picks_its_top_tokens(tiny, rec, budget):
    """source = the layer itself and no partial map: the speculation is the layer's own attention, so the
    pick is, per KV head, the tokens with the largest past probability summed over its G heads (each head
    renormalized over the past), budget * t of them rounded up as the engine counts, and the recall their
    true mass plus the current token's. (At 0.1 and 0.5, t = 25: 3 and 13 tokens, not 2 and 12.)"""
    got = []
    for p in rec.p[2]:                                                      # (H, t+1)
        t = p.shape[-1] - 1
        past = p[:, :t] / p[:, :t].sum(-1, keepdim=True)
        score = past.view(2, 2, t).sum(1)                                   # (Hkv, t): G = 2
        k = math.ceil(Fraction(str(budget)) * t)                            # exactly, in decimals
        pick = torch.zeros(2, t).scatter_(1, score.topk(k).indices, 1).repeat_interleave(2, 0)   # (H, t)
        got.append(((p[:, :t] * pick).sum(-1) + p[:, t]).mean().item())
    want = sum(got) / len(got)
    assert lab.speculated_recall(tiny, rec, 2, budget, source=2) == pytest.approx(want, abs=1e-6)
    assert (want == pytest.approx(1.0)) == (budget == 1.0)


# --- Driving a cache: the plain offload and the layer-ahead fetch against the engine
def test_naive_offload_copies_every_past_token_and_equals_full(tiny):
    cfg, new = tiny.cfg, 6
    naive = lab.NaiveOffload(cfg, 1, len(IDS) + new)
    out, logits = lab.run_cache(tiny, naive, IDS, new)
    _, want = lab.run_cache(tiny, M.DenseCache(cfg, 1, len(IDS) + new, "cpu", torch.float32), IDS, new, out)
    # Equal to rounding: the naive cache attends over its t0 + T keys, the dense one over all S, masked
    # (bit for bit on some CPUs, not on all: an AMD EPYC differs in the last bits).
    assert torch.allclose(logits, want, rtol=0, atol=1e-5), (logits - want).abs().max()
    assert naive.copied == cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 4 * pasts(new)


@pytest.mark.parametrize("budget,alpha", [(1.0, float("inf")), (0.3, float("inf")), (0.5, 2.0)])
def test_layer_ahead_equals_the_engine(tiny, budget, alpha):
    """The same tokens fetched as the engine's infinigen (logits to rounding), and bytes: the dense
    layers' whole past plus one K and one V row per token fetched."""
    pol, new = I.Policy("infinigen", budget=budget, alpha=alpha, layer_budget="uniform", dense_layers=1), 6
    P = I.calibrate(tiny, torch.tensor([IDS]), pol)
    mine = lab.LayerAhead(tiny, pol, P, 1, len(IDS) + new)
    out, logits = lab.run_cache(tiny, mine, IDS, new)
    engine = I.make_cache(tiny, pol, 1, len(IDS) + new)
    _, want = lab.run_cache(tiny, engine, IDS, new, feed=out)
    assert torch.allclose(logits, want, atol=1e-5)
    cfg, row = tiny.cfg, 2 * tiny.cfg.head_dim * 4                          # K and V of one head, float32
    dense = cfg.n_kv_heads * row * pasts(new)                                 # layer 0, every step
    sent = engine.store.ledger.decode_bytes()                  # the host gather adds an 8-byte position
    assert sent % (row + 8) == 0 and mine.copied == dense + sent // (row + 8) * row
    if budget == 1.0:                                                       # every past token, every layer
        assert mine.copied == cfg.n_layers * dense
