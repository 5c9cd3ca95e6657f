"""skew.py: the SVD skew is orthogonal and changes no score, GQA grouping, column choice, the partial
map P = A[:, :, cols], and folding A into a random OPT's weights leaves its logits unchanged. CPU."""
import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import model
import skew as SK
from helpers import randomize

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])




def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def random_orthogonal(g, n, d):
    """(n, d, d) orthogonal matrices (QR of Gaussians, signs fixed so the law is uniform)."""
    q, r = torch.linalg.qr(randn(g, n, d, d).double())
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]).float()


# --- Strategies
@st.composite
def gqa(draw, min_rows_per_dim=None):
    """Shapes of a GQA layer and a seed: Hkv, G, d (even), N calibration tokens."""
    n_kv, G = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    d = draw(st.sampled_from([2, 4, 6, 8, 16, 32]))
    lo = 1 if min_rows_per_dim is None else -(-d // G)          # G * N >= d when asked
    N = draw(st.integers(lo, max(lo, 2 * d)))
    return dict(n_kv=n_kv, G=G, H=n_kv * G, d=d, N=N, seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def calib(draw, min_rows_per_dim=None):
    """Calibration queries (N, H, d) and keys (N, Hkv, d) with uneven column scales (realistic energy)."""
    s = draw(gqa(min_rows_per_dim))
    g = torch.Generator().manual_seed(s["seed"])
    scale = 0.1 + 3 * torch.rand(s["d"], generator=g)                     # some columns carry more energy
    q = randn(g, s["N"], s["H"], s["d"]) * scale + 0.3 * randn(g, s["d"])
    k = randn(g, s["N"], s["n_kv"], s["d"]) * scale.flip(0) + 0.3 * randn(g, s["d"])
    return dict(s, q=q, k=k, ratio=draw(st.sampled_from([0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0])))


# --- Grouping
@HYP
@given(s=gqa())
def test_group_queries_stacks_the_heads_of_each_kv_head(s):
    g = torch.Generator().manual_seed(s["seed"])
    q = randn(g, s["N"], s["H"], s["d"])
    qg = SK.group_queries(q, s["n_kv"])
    assert qg.shape == (s["n_kv"], s["G"] * s["N"], s["d"])
    for j in range(s["n_kv"]):   # KV head j serves query heads j*G .. j*G+G-1 (as SDPA's enable_gqa does)
        want = torch.cat([q[:, j * s["G"] + i] for i in range(s["G"])])
        assert torch.equal(qg[j], want), f"KV head {j}"


# --- SVD skew
@HYP
@given(c=calib(min_rows_per_dim=True))
def test_svd_skew_is_orthogonal_and_sorted(c):
    qg = SK.group_queries(c["q"], c["n_kv"])
    A = SK.svd_skew(qg)
    d = c["d"]
    assert A.shape == (c["n_kv"], d, d) and A.dtype == qg.dtype
    eye = torch.eye(d).expand_as(A)
    assert (A.transpose(1, 2) @ A - eye).abs().max() <= 1e-5
    assert (A @ A.transpose(1, 2) - eye).abs().max() <= 1e-5
    energy = (qg.double() @ A.double()).norm(dim=1)                       # (Hkv, d): the singular values
    assert (energy[:, 1:] <= energy[:, :-1] * (1 + 1e-5) + 1e-5).all(), energy
    sv = torch.linalg.svdvals(qg.double())
    assert torch.allclose(energy, sv, rtol=1e-5, atol=1e-5)


def test_svd_skew_few_rows_is_still_square():
    qg = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    A = SK.svd_skew(qg)
    assert A.shape == (2, 16, 16)
    assert (A @ A.transpose(1, 2) - torch.eye(16)).abs().max() <= 1e-5


@HYP
@given(s=gqa(), B=st.integers(1, 2), T=st.integers(1, 5), Tk=st.integers(1, 6), use_svd=st.booleans())
def test_skewed_scores_equal_unskewed(s, B, T, Tk, use_svd):
    g = torch.Generator().manual_seed(s["seed"])
    n_kv, G, d = s["n_kv"], s["G"], s["d"]
    q, k = randn(g, B, s["H"], T, d), randn(g, B, n_kv, Tk, d)
    A = SK.svd_skew(randn(g, n_kv, d + 3, d)) if use_svd else random_orthogonal(g, n_kv, d)
    qs, ks = SK.apply_skew(q, A), SK.apply_skew(k, A)
    assert qs.shape == q.shape and ks.shape == k.shape
    for h in range(s["H"]):      # query head h uses KV head h // G, and both are rotated by A[h // G]
        j = h // G
        assert torch.allclose(qs[:, h], q[:, h] @ A[j], atol=1e-5)
        want = q[:, h] @ k[:, j].transpose(-1, -2)
        got = qs[:, h] @ ks[:, j].transpose(-1, -2)
        tol = 1e-5 * max(1.0, want.abs().max().item())
        assert (got - want).abs().max() <= tol, f"head {h}"
    if d > 1:   # the rotation is not the identity: skewed q differs (the check above is not vacuous)
        assert not torch.allclose(qs, q, atol=1e-3)


# --- Partial columns
@HYP
@given(c=calib(), planes=st.booleans(), rotate=st.booleans())
def test_choose_columns(c, planes, rotate):
    d, n_kv = c["d"], c["n_kv"]
    qg, kg = SK.group_queries(c["q"], n_kv), c["k"].transpose(0, 1)
    if rotate:
        A = random_orthogonal(torch.Generator().manual_seed(c["seed"] + 1), n_kv, d)
        qg, kg = qg @ A, kg @ A
    cols = SK.choose_columns(qg, kg, c["ratio"], planes=planes)
    m = SK.n_columns(c["ratio"], d, planes)
    assert m <= d and m >= 1 and (not planes or m % 2 == 0)
    assert cols.shape == (n_kv, m) and cols.dtype == torch.long
    for j in range(n_kv):
        row = cols[j].tolist()
        assert row == sorted(set(row)), f"KV head {j}: {row} not distinct and sorted"
        assert all(0 <= c_ < d for c_ in row)
        if planes:
            half = d // 2
            low = [c_ for c_ in row if c_ < half]
            assert (len(low) == m // 2
                    and row == sorted(low + [c_ + half for c_ in low])), f"planes broken: {row}"
            e = SK.plane_energy(qg, kg)[j]
            chosen = torch.zeros(half, dtype=torch.bool)
            chosen[low] = True
        else:
            e = SK.column_energy(qg, kg)[j]
            chosen = torch.zeros(d, dtype=torch.bool)
            chosen[row] = True
        if (~chosen).any():   # the most energetic columns (planes) are the ones kept
            assert e[chosen].min() >= e[~chosen].max() - 1e-6


def test_column_energy_is_query_times_key_magnitude():
    """By hand: column 5 has small queries and huge keys, column 6 the largest queries and small keys;
    the energy weighs both, so column 5 is the one kept."""
    qg, kg = torch.ones(1, 4, 8), torch.full((1, 4, 8), 0.1)                   # (Hkv, N, d)
    qg[..., 6], kg[..., 5], qg[0, :2, 2] = 2.0, 10.0, -3.0                      # |q| counts, not its sign
    want = [1.0 * 0.1] * 8
    want[2], want[5], want[6] = 2.0 * 0.1, 1.0 * 10.0, 2.0 * 0.1
    assert torch.allclose(SK.column_energy(qg, kg)[0], torch.tensor(want))
    assert SK.choose_columns(qg, kg, 1 / 8).tolist() == [[5]]
    e = SK.plane_energy(qg, kg)[0]                                               # planes (j, j + 4)
    assert e.argmax().item() == 1 and torch.isclose(e[1], torch.tensor(2 ** 0.5 * 100.01 ** 0.5))


@pytest.mark.parametrize("ratio,d,planes,m", [(0.25, 64, False, 16), (0.25, 64, True, 16),
                                              (0.01, 64, False, 1), (0.01, 64, True, 2), (1.0, 8, True, 8),
                                              (0.3, 10, True, 4), (0.3, 10, False, 3)])
def test_n_columns(ratio, d, planes, m):
    assert SK.n_columns(ratio, d, planes) == m


@HYP
@given(c=calib(min_rows_per_dim=True), mode=st.sampled_from(SK.MODES))
def test_make_skew_partial_map(c, mode):
    n_kv, d, ratio = c["n_kv"], c["d"], c["ratio"]
    P, A = SK.make_skew(c["q"], c["k"], mode, ratio)
    m = SK.n_columns(ratio, d, mode == "planes")
    assert A.shape == (n_kv, d, d) and P.shape == (n_kv, d, m)
    qg, kg = SK.group_queries(c["q"], n_kv), c["k"].transpose(0, 1)
    if mode == "svd":
        assert torch.allclose(A, SK.svd_skew(qg))
    else:
        assert torch.equal(A, torch.eye(d).expand(n_kv, d, d))
    cols = SK.choose_columns(qg @ A, kg @ A, ratio, planes=mode == "planes")
    for j in range(n_kv):
        assert torch.equal(P[j], A[j][:, cols[j]]), f"KV head {j}: P is not A[:, :, cols]"
    assert (P.transpose(1, 2) @ P - torch.eye(m)).abs().max() <= 1e-5
    if m == d:   # all columns: partial scores are the full scores
        q0, k0 = c["q"][:, :1].transpose(0, 1), c["k"][:, :1].transpose(0, 1)       # head 0 and KV head 0
        assert torch.allclose((q0 @ P[0]) @ (k0 @ P[0]).transpose(-1, -2), q0 @ k0.transpose(-1, -2),
                              rtol=1e-4, atol=1e-4)


def test_make_skew_unknown_mode():
    with pytest.raises(ValueError, match="unknown skew mode 'pca'"):
        SK.make_skew(torch.randn(4, 2, 8), torch.randn(4, 1, 8), "pca", 0.25)


@pytest.mark.parametrize("mode", ["none", "planes"])
def test_make_skew_stays_on_the_calibration_device(mode):
    q, k = torch.randn(30, 4, 8, device="meta"), torch.randn(30, 2, 8, device="meta")
    P, A = SK.make_skew(q, k, mode, 0.25)
    assert P.device == q.device and A.device == q.device


def test_partial_query_weight_rows_follow_each_query_heads_kv_head():
    """Hkv 2, G 2, d 4: KV head 0 keeps dims (0, 2), KV head 1 dims (1, 3). Query heads 0 and 1 share
    KV head 0, heads 2 and 3 KV head 1 (head h reads KV head h // G), so their rows of Wq follow."""
    d, n_kv, G, C = 4, 2, 2, 5
    P = torch.zeros(n_kv, d, 2)                                                  # (Hkv, d, m)
    P[0, 0, 0] = P[0, 2, 1] = P[1, 1, 0] = P[1, 3, 1] = 1.0
    g = torch.Generator().manual_seed(0)
    wq, bq = randn(g, n_kv * G * d, C), randn(g, n_kv * G * d)
    Wp, bp, kept = SK.partial_query_weight(wq, bq, P)
    rows = [h * d + c for h, cols in enumerate([(0, 2), (0, 2), (1, 3), (1, 3)]) for c in cols]
    assert torch.equal(Wp, wq[rows]) and torch.equal(bp, bq[rows])
    assert kept.tolist() == [[0, 2], [0, 2], [1, 3], [1, 3]]                    # (H, m): for RoPE


# --- Folding into a random OPT
def random_opt(folder, seed, layers, heads, head_dim, pre_norm, vocab=61):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hidden = heads * head_dim
    hf = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        max_position_embeddings=64, word_embed_proj_dim=hidden,
                                        do_layer_norm_before=pre_norm, dropout=0.0, attention_dropout=0.0))
    randomize(hf, seed)                     # peaky attention and non-zero biases: a wrong fold would show
    hf.save_pretrained(folder)
    m, _ = model.load(folder)
    assert m.cfg.arch == "opt" and m.cfg.n_kv_heads == heads and m.cfg.head_dim == head_dim
    return m


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), layers=st.integers(1, 3), heads=st.integers(1, 4),
       head_dim=st.sampled_from([4, 8, 16]), pre_norm=st.booleans(), T=st.integers(2, 12))
def test_fold_into_opt_weights_keeps_logits(seed, layers, heads, head_dim, pre_norm, T):
    with tempfile.TemporaryDirectory() as d:
        m = random_opt(d, seed, layers, heads, head_dim, pre_norm)
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, m.cfg.vocab_size, (2, T), generator=g)
    x = torch.randn(2, T, m.cfg.dim, generator=g)
    with torch.no_grad():
        before = m(toks)
        q_before = [blk.attn.query(x, None) for blk in m.layers]
        k_before = [blk.attn.heads(blk.attn.wk(x), heads) for blk in m.layers]
        As = [random_orthogonal(g, heads, head_dim) for _ in m.layers]
        for blk, A in zip(m.layers, As):
            SK.fold_into_weights(blk.attn, A)
        after = m(toks)
        for i, (blk, A) in enumerate(zip(m.layers, As)):   # q and k now come out skewed by A, per head
            q_after = blk.attn.query(x, None)
            k_after = blk.attn.heads(blk.attn.wk(x), heads)
            assert torch.allclose(q_after, SK.apply_skew(q_before[i], A), atol=1e-4), f"layer {i} q"
            assert torch.allclose(k_after, SK.apply_skew(k_before[i], A), atol=1e-4), f"layer {i} k"
            if head_dim > 1:
                assert not torch.allclose(q_after, q_before[i], atol=1e-3), f"layer {i}: fold changed nothing"
    tol = 1e-4 * max(1.0, before.abs().max().item())
    err = (after - before).abs().max().item()
    assert err <= tol, f"logits moved by {err:.3g} > {tol:.3g}"


# --- Layer shares of the budget
@HYP
@given(need=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=12), first=st.integers(0, 3))
def test_layer_shares_keep_the_mean(need, first):
    need = torch.tensor([0.5] * first + need)
    share = SK.layer_shares(need, first)
    assert torch.equal(share[:first], torch.ones(first))
    assert abs(share[first:].mean().item() - 1.0) < 1e-5
    order = need[first:].argsort()
    assert (share[first:][order].diff() >= -1e-6).all(), "more need must not get a smaller share"
    assert share[first:].max() <= share[first:].min() * 4.0 / 0.2 * (1 + 1e-5), "no layer starves"


@HYP
@given(need=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=12), budget=st.floats(0.05, 1.0))
def test_layer_shares_never_ask_a_layer_for_more_than_its_past(need, budget):
    """A high budget caps the layers that need most at their whole past (share x budget <= 1) and gives
    what they cannot use to the others: the mean, the budget, stays, and so does the order."""
    need = torch.tensor(need, dtype=torch.float64)
    share = SK.layer_shares(need, 0, budget=budget)
    assert (share * budget <= 1 + 1e-9).all(), (share * budget).max()
    assert abs(share.mean().item() - 1.0) < 1e-9
    assert (share[need.argsort()].diff() >= -1e-9).all(), "more need must not get a smaller share"
    if (SK.layer_shares(need, 0) * budget <= 1).all():
        assert torch.equal(share, SK.layer_shares(need, 0)), "no cap reached: the split is unchanged"


def test_layer_shares_clamp_each_ratio_before_rescaling():
    """need 0.001 and 1.0: ratios to the mean 0.002 and 1.998, the first raised to 0.2, then both
    rescaled to mean 1 (a layer that needs little still gets a fifth of the mean before rescaling)."""
    share = SK.layer_shares(torch.tensor([7.0, 0.001, 1.0]), 1)
    w = torch.tensor([0.2, 2 * 1.0 / 1.001])
    assert torch.allclose(share, torch.cat([torch.ones(1), w / w.mean()]))


def test_needed_share_counts_the_heaviest_keys():
    mask = torch.ones(1, 1, 2, 10, dtype=torch.bool)
    p = torch.zeros(1, 1, 2, 10)
    p[..., 0, 3] = 1.0                                   # one key holds everything
    p[..., 1, :] = 0.1                                   # ten keys hold 0.1 each
    share = SK.needed_share(p, mask, mass=0.9)           # (1/10 + 9/10) / 2 (0.9 needs 9 or 10)
    assert abs(share.item() - 0.5) < 0.051
    exact = torch.tensor([0.25, 0.5, 0.25])[None, None, None]              # heaviest two hold 0.75 exactly
    share = SK.needed_share(exact, torch.ones(1, 1, 1, 3, dtype=torch.bool), mass=0.75)
    assert share.item() == pytest.approx(2 / 3)
    lone = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    lone[..., 0] = True                                  # a query that sees one key is skipped
    assert SK.needed_share(torch.ones(1, 1, 1, 10), lone).item() == 0.0


@HYP
@given(Hkv=st.integers(1, 3), G=st.integers(1, 3), Tq=st.integers(1, 4), n=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_needed_share_takes_a_mask_per_kv_head(Hkv, G, Tq, n, seed):
    """A mask per KV head (B, Hkv, Tq, n), as a fetch by index gives, means the same as that mask
    repeated for each of the KV head's G query heads."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, Hkv, Tq, n, generator=g) < 0.7
    p = torch.rand(2, Hkv * G, Tq, n, generator=g) * mask.repeat_interleave(G, 1)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
    want = SK.needed_share(p, mask.repeat_interleave(G, 1))
    assert torch.equal(SK.needed_share(p, mask), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_speculate_never_gives_nan(dtype):
    """Partial scores past float16's range (inf) are clamped, so the selection is made from numbers."""
    qp = torch.full((1, 1, 2, 4), 200.0, dtype=dtype)                        # (B, Hkv, G, m)
    kpart = torch.full((1, 1, 5, 4), 3000.0, dtype=dtype)                    # (B, Hkv, t, m): 300000 scaled
    kpart[0, 0, 2] = -3000.0
    s = SK.speculate(qp, kpart, 0.125)
    assert not s.isnan().any() and s.dtype == torch.float32
    sel = SK.threshold_select(s, math.inf, torch.tensor([4]), torch.ones(1, 1, 5, dtype=torch.bool), 4)
    assert sel[0, 0].tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_speculate_scales_before_the_product(dtype):
    """Products past float16's range unscaled (240000, 232000) but not scaled (30000, 29000) keep their order;
    float32 and float64 give exactly the scaled product's scores (a power-of-two scale changes no rounding),
    in their own precision."""
    qp = torch.full((1, 1, 1, 4), 200.0, dtype=dtype)                        # (B, Hkv, G, m)
    kpart = torch.tensor([300.0, 290.0, 0.0])[:, None].expand(3, 4)[None, None].to(dtype)   # (B, Hkv, t, m)
    s = SK.speculate(qp, kpart, 0.125)[0, 0]                                 # (t,)
    assert s[0] > s[1] > s[2]
    if dtype != torch.float16:
        assert torch.equal(s, torch.tensor([30000.0, 29000.0, 0.0], dtype=dtype).log_softmax(-1))
