"""The policies against `full` on a random GQA Llama, a random OPT (both saved by transformers and read
back with model.load) and the default SmolLM2: offload is exact; infinigen (alpha=inf, budget 1, every
skew), h2o, oracle and streaming at budget 1 change nothing, alone and in a padded batch; at budget 0.1
infinigen fetches what it should and moves fewer bytes; recall; the bounded CPU pool. CPU, float32;
a CUDA class runs when a GPU is present."""
import copy
import dataclasses
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infinigen as IG
import model
import offload
import skew as SK
from helpers import default_model_folder, randomize
from infinigen import Policy

N_NEW = 16
SKEWS = ("none", "svd", "planes")


# --- Helpers
def assert_close(ours, ref, rel, what):
    """max |ours - ref| <= rel * max(1, max |ref|)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite logits"
    tol = rel * max(1.0, ref.abs().max().item())
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > tol {tol:.3g}"


def assert_same_ids(got, ref, ref_logits, rel, what):
    """Greedy tokens got == ref (lists) before the first step whose choice the logits' tolerance cannot
    decide: ref's top two logits (ref_logits (n, V)) within 2 x the tolerance of assert_close (float16
    rounding may pick either there, and the rest then follows another path)."""
    assert len(got) == len(ref) == ref_logits.shape[0], f"{what}: lengths {len(got)}, {len(ref)}"
    top2 = ref_logits.float().topk(2, -1).values                                        # (n, 2)
    tied = ((top2[:, 0] - top2[:, 1]) <= 2 * rel * max(1.0, ref_logits.abs().max().item())).tolist()
    n = next((i for i, t in enumerate(tied) if t), len(ref))                  # the first undecided step
    assert got[:n] == ref[:n], f"{what}: {got} != {ref}"


def padded(prompts):
    """Left-padded (B, T) tokens and valid mask, as generate() builds them."""
    T = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):], valid[b, T - len(p):] = torch.tensor(p), True
    return tokens, valid


@torch.no_grad()
def forced_logits(m, prompts, pol, forced, chunk=1024, partial=None):
    """Drive prefill/decode_one ourselves, feeding `forced` (B, n) tokens: logits (B, n, V), where
    [:, i] predicts token i (the prompt's last position for i = 0). The prompt in `chunk`-token pieces."""
    tokens, valid = padded(prompts)
    cache = IG.make_cache(m, pol, len(prompts), tokens.shape[1] + forced.shape[1], partial)
    dev = next(m.parameters()).device
    forced = forced.to(dev)
    out = [IG.prefill(m, cache, tokens.to(dev), valid, chunk=chunk)]
    for i in range(forced.shape[1] - 1):
        out.append(IG.decode_one(m, cache, forced[:, i]))
    return torch.stack(out, 1)


def expected_offload_h2d(m, prompts, n_new):
    """Bytes per decode step of `offload`: every layer's whole past, K and V, each step."""
    c, B, T = m.cfg, len(prompts), max(map(len, prompts))
    elt = next(m.parameters()).element_size()
    steps = [2 * c.n_layers * (T + i) * B * c.n_kv_heads * c.head_dim * elt for i in range(n_new - 1)]
    return round(sum(steps) / len(steps))


class Case:
    """A model, two prompts of different lengths, and memoized runs."""
    def __init__(self, name, m, prompts):
        self.name, self.m, self.prompts, self.runs = name, m, prompts, {}

    def generate(self, pol, batch=False):
        key = (repr(pol), batch)
        if key not in self.runs:
            self.runs[key] = IG.generate(self.m, self.prompts if batch else self.prompts[:1], pol, N_NEW)
        return self.runs[key]

    def full(self, batch=False):
        """Reference tokens (B, n) and logits (B, n, V) of `full`."""
        key = ("full-logits", batch)
        if key not in self.runs:
            ids, _ = self.generate(Policy("full"), batch)
            ids = torch.tensor(ids)
            assert ids.shape == (2 if batch else 1, N_NEW)
            for row in ids.tolist():   # a model that repeats one token would make every comparison weak
                assert len(set(row)) >= 3, f"{self.name}: degenerate greedy output {row}"
            self.runs[key] = ids, forced_logits(self.m, self.prompts[:ids.shape[0]], Policy("full"), ids)
        return self.runs[key]


def hf_random(folder, arch, seed):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if arch == "llama":   # GQA: 6 query heads over 2 KV heads, head_dim 16 != hidden/heads
        cfg = tf.LlamaConfig(vocab_size=101, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=256)
        hf = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.OPTConfig(vocab_size=101, hidden_size=64, ffn_dim=128, num_hidden_layers=4,
                           num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                           dropout=0.0, attention_dropout=0.0,
                           tie_word_embeddings=False)
        hf = tf.OPTForCausalLM(cfg)
    randomize(hf, seed).save_pretrained(folder)
    m, _ = model.load(str(folder), dtype=torch.float32)
    assert m.cfg.arch == arch
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (30, 19)]
    return m, prompts


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    m, prompts = hf_random(tmp_path_factory.mktemp("llama"), "llama", 1)
    assert m.cfg.n_kv_heads == 2 and m.cfg.n_heads == 6
    return Case("llama", m, prompts)


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    return Case("opt", *hf_random(tmp_path_factory.mktemp("opt"), "opt", 0))


@pytest.fixture(scope="module")
def default():
    folder = default_model_folder()
    m, _ = model.load(folder)
    tok = IG.Tok(folder)
    prompts = [tok.encode("Write a short story about a robot who learns to paint."),
               tok.encode("Name three colors.")]
    assert len(prompts[0]) != len(prompts[1])
    return Case("default", m, prompts)


@pytest.fixture(scope="module", params=["llama", "opt", "default"])
def case(request):
    return request.getfixturevalue(request.param)


VARIANTS = {f"infinigen-{s}": Policy("infinigen", budget=1.0, alpha=math.inf, skew=s) for s in SKEWS}
VARIANTS.update({n: Policy(n, budget=1.0) for n in ("h2o", "oracle", "streaming")})
VARIANTS.update({f"{n}-layer-budget": Policy(n, budget=1.0, layer_budget="prompt")
                 for n in ("infinigen", "h2o")})


# --- Selection math
@st.composite
def scored(draw):
    B, Hkv, S = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(B, Hkv, S, generator=g).round(decimals=1)       # ties happen
    share = draw(st.sampled_from([0.5, 0.9, 1.0]))
    allowed = torch.rand(B, draw(st.sampled_from([1, Hkv])), S, generator=g) < share
    k = torch.tensor(draw(st.lists(st.integers(0, S + 2), min_size=B, max_size=B)))
    return scores, k, allowed


def check_top(sel, scores, allowed, want_counts):
    """sel holds want_counts (B, Hkv) allowed tokens per (b, h), and none scores below one left out."""
    allowed = allowed.expand_as(sel)
    assert not (sel & ~allowed).any(), "a token that is not allowed was selected"
    assert torch.equal(sel.sum(-1), want_counts)
    lo = scores.masked_fill(~sel, float("inf")).amin(-1)
    hi = scores.masked_fill(~allowed | sel, float("-inf")).amax(-1)
    assert ((lo >= hi) | (want_counts == 0)).all(), "a better allowed token was left out"


@settings(max_examples=60, deadline=None)
@given(c=scored(), extra=st.none() | st.integers(0, 4))
def test_topk_mask(c, extra):
    """k best allowed per row; the same with kmax, a host-side bound >= k.max(), given."""
    scores, k, allowed = c
    sel = SK.topk_mask(scores, k, allowed, None if extra is None else int(k.max()) + extra)
    assert sel.shape == scores.shape and sel.dtype == torch.bool
    check_top(sel, scores, allowed, torch.minimum(k[:, None], allowed.expand_as(scores).sum(-1)))


@settings(max_examples=60, deadline=None)
@given(c=scored(), alpha=st.sampled_from([0.0, 0.15, 0.5, 2.0, math.inf]))
def test_threshold_select(c, alpha):
    scores, k, allowed = c
    sel = SK.threshold_select(scores, alpha, k, allowed)
    a = allowed.expand_as(scores)
    best = scores.masked_fill(~a, float("-inf")).amax(-1, keepdim=True)
    near = a & (scores >= best - alpha)
    assert not (sel & ~near).any(), "selected a token further than alpha from the best"
    check_top(sel, scores, near, torch.minimum(k[:, None], near.sum(-1)))


@settings(max_examples=80, deadline=None)
@given(c=scored(), alpha=st.sampled_from([0.0, 0.15, 0.5, 2.0, math.inf]), extra=st.integers(0, 3),
       distinct=st.booleans())
def test_top_slots_are_the_threshold_rule_as_slots(c, alpha, extra, distinct):
    """The engine's selection in one top-k and one sort: each head's best k within alpha, slots ascending,
    then padding (ok False, a valid slot); the same tokens as the mask path (topk_mask over the tokens within
    alpha, to_index), slot for slot when no scores tie; a bound below k refused on the CPU."""
    scores, k, allowed = c
    if distinct:                                                     # no ties: one right answer
        scores = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(k.sum().item()))
        scores = scores.view_as(scores.new_empty(c[0].shape)).float() / 7
    a = allowed.expand_as(scores)
    s = scores.masked_fill(~a, float("-inf"))
    kmax, w = int(k.max()) + extra, scores.shape[-1]
    idx, ok = SK.top_slots(s, k, kmax, alpha)
    n = max(min(kmax, w), 1)
    assert idx.shape == ok.shape == (*scores.shape[:2], n) and ((idx >= 0) & (idx < w)).all()
    assert (ok[..., :-1] >= ok[..., 1:]).all(), "the selected slots come first"
    assert (idx[..., 1:] > idx[..., :-1])[ok[..., 1:]].all(), "each in slot order"
    near = a & (s >= s.amax(-1, keepdim=True) - alpha)
    sel = SK.as_mask(idx, ok, w)
    assert not (sel & ~near).any(), "selected a token further than alpha from the best"
    check_top(sel, scores, near, torch.minimum(k[:, None], near.sum(-1)))
    if distinct:
        want_idx, want_ok = SK.to_index(SK.topk_mask(scores, k, near, kmax), kmax)
        assert torch.equal(ok, want_ok) and torch.equal(idx[ok], want_idx[want_ok])
    if int(k.max()) > 0 and int(k.max()) <= w:
        with pytest.raises(ValueError, match="exceeds its bound"):
            SK.top_slots(s, k, int(k.max()) - 1, alpha)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
SLOTS_DEV = "cuda" if torch.cuda.is_available() else "cpu"          # the compiled kernel, or the interpreter


@needs_triton
@pytest.mark.parametrize("w, kmax", [(1000, 100), (5000, 512), (300, 300)])
@pytest.mark.parametrize("alpha", [1.0, math.inf])
def test_top_slots_kernel_on_long_rows(w, kmax, alpha):
    """Rows of a real context's length (held in registers up to 16384 scores: 8192 here), a sequence's
    unwritten slots not allowed: the kernel's slots and padding are top_slots', slot for slot."""
    g = torch.Generator().manual_seed(w)
    s = torch.randn(2, 3, w, generator=g)
    s[0, :, w // 2:] = float("-inf")                                 # a shorter sequence
    k = torch.tensor([kmax // 3, kmax])
    fn = offload.device_kernel("top_slots", cuda=True)
    got = [t.cpu() for t in fn(s.to(SLOTS_DEV), k.to(SLOTS_DEV), min(kmax, w), alpha)]
    want = SK.top_slots(s, k, kmax, alpha)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
@pytest.mark.parametrize("s, want", [([-0.0, 0.0, 1.0], [0, 2]), ([0.0, -0.0, 1.0], [0, 2]),
                                     ([-0.0, -1e-30, 0.0], [0, 2])])
def test_top_slots_kernel_ties_signed_zeros(s, want):
    """-0.0 equals 0.0: of the two tied zeros the kernel keeps the first, as torch does (its bit trick alone
    would order -0.0 below 0.0). Hypothesis finds such rows (scores rounded to tenths), not every run."""
    s, k = torch.tensor([[s]], device=SLOTS_DEV), torch.tensor([2], device=SLOTS_DEV)
    idx, ok = (t.cpu() for t in offload.device_kernel("top_slots", cuda=True)(s, k, 2))
    assert idx[0, 0].tolist() == want == SK.top_slots(s.cpu(), k.cpu(), 2)[0][0, 0].tolist() and ok.all()


@pytest.mark.parametrize("slots", ["torch", pytest.param("kernel", marks=needs_triton),
                                   pytest.param("fused", marks=needs_triton), "torch fused"])
def test_top_slots_keep_nothing_of_a_head_with_no_past(slots, monkeypatch):
    """A head whose every score is -inf (nothing allowed) or NaN keeps nothing: padding only (with the
    kernel too; and from two query heads' partial scores, which SLOTS = "fused" hands top_slots)."""
    monkeypatch.setattr(SK, "SLOTS", slots.split()[0])
    s = torch.tensor([[[0.5, -1.0, 2.0], [float("-inf")] * 3, [float("nan")] * 3]], device=SLOTS_DEV)
    s = s[:, :, None].expand(-1, -1, 2, -1) if slots.endswith("fused") else s      # (1, 3, 2, 3)
    idx, ok = (t.cpu() for t in SK.top_slots(s, torch.tensor([2], device=SLOTS_DEV), 2))   # (1, 3, 2)
    assert ok.tolist() == [[[True, True], [False, False], [False, False]]]
    assert idx[0, 0].tolist() == [0, 2] and ((idx >= 0) & (idx < 3)).all()


@needs_triton
@settings(max_examples=20, deadline=None)
@given(c=scored(), alpha=st.sampled_from([0.0, 0.5, 2.0, math.inf]), extra=st.integers(0, 3),
       distinct=st.booleans())
def test_top_slots_kernel_is_top_slots(c, alpha, extra, distinct):
    """kernel.top_slots (one Triton kernel: a binary search over the scores' bits for the k-th best, then
    the kept slots compacted in order; on a CPU Triton's interpreter) selects as skew.top_slots: slot for
    slot when no scores tie; with ties the same number of tokens, none further than alpha from the best
    nor worse than one left out, the first of the tied ones."""
    scores, k, allowed = c
    if distinct:
        scores = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(k.sum().item()))
        scores = scores.view_as(c[0]).float() / 7
    a = allowed.expand_as(scores)
    s = scores.masked_fill(~a, float("-inf"))
    kmax, w = int(k.max()) + extra, scores.shape[-1]
    n = max(min(kmax, w), 1)
    fn = offload.device_kernel("top_slots", cuda=True)
    idx, ok = (t.cpu() for t in fn(s.to(SLOTS_DEV), k.to(SLOTS_DEV), n, alpha))
    want_idx, want_ok = SK.top_slots(s, k, kmax, alpha)
    if distinct:
        assert torch.equal(idx, want_idx) and torch.equal(ok, want_ok)
    assert torch.equal(ok, want_ok), "a different number of tokens, or not first"
    assert (idx[..., 1:] > idx[..., :-1])[ok[..., 1:]].all() and (idx[~ok] == w - 1).all()
    near = a & (s >= s.amax(-1, keepdim=True) - alpha)
    sel = SK.as_mask(idx, ok, w)
    assert not (sel & ~near).any(), "selected a token further than alpha from the best"
    check_top(sel, scores, near, torch.minimum(k[:, None], near.sum(-1)))
    worst = scores.masked_fill(~sel, float("inf")).amin(-1, keepdim=True)           # the k-th best, tied
    tied = near & (scores == worst) & ~sel
    first_left = torch.where(tied, torch.arange(w), w).amin(-1)                    # the first tie left out
    last_kept = torch.where(sel & (scores == worst), torch.arange(w), -1).amax(-1)
    assert (last_kept < first_left).all(), "of tied tokens, the first are kept"


@needs_triton
@pytest.mark.parametrize("name", ["infinigen", "oracle", "infinigen fused", "infinigen fused alpha",
                                  "infinigen fused mean"])
def test_the_engine_selects_the_same_with_the_slots_kernel(llama, name, monkeypatch):
    """skew.SLOTS = "kernel": InfiniGen's and the oracle's selections come from the kernel (it runs, once
    per sparse layer and step), and every logit of a decode is the same as with torch's top-k. "fused":
    InfiniGen speculates with three kernels (their scores differ from torch's in the last bits: these
    selections have no ties that close), also within alpha of the best and with the authors' mean count.
    On a GPU machine the model is a CUDA copy (the compiled kernels read device memory only)."""
    name, slots, rule = (name.split() + ["", ""])[:3]
    slots = slots or "kernel"
    kernels = ["partial_scores", "top_slots"] if slots == "fused" else ["top_slots"]
    m, prompts = (llama.m if SLOTS_DEV == "cpu" else copy.deepcopy(llama.m).to(SLOTS_DEV)), llama.prompts
    forced = torch.randint(0, m.cfg.vocab_size, (len(prompts), 4), generator=torch.Generator().manual_seed(1))
    pol = Policy(name, budget=0.3, **{"": {}, "alpha": dict(alpha=1.0),
                                      "mean": dict(alpha=4.0, head_count="mean")}[rule])
    want = forced_logits(m, prompts, pol, forced)
    calls, real = [], offload.device_kernel
    monkeypatch.setattr(offload, "device_kernel", lambda nm, cuda=False: lambda *a, **k: calls.append(nm)
                        or real(nm, cuda)(*a, **k))
    monkeypatch.setattr(SK, "SLOTS", slots)
    got = forced_logits(m, prompts, pol, forced)
    chose = [c for c in calls if c in kernels]                   # (on CUDA the device gather's kernels too)
    assert chose == kernels * (m.cfg.n_layers - pol.dense_layers) * 3 and torch.equal(got, want)


@st.composite
def attn_case(draw):
    arch = draw(st.sampled_from(["llama", "opt"]))
    n_kv, d = draw(st.integers(1, 3)), draw(st.sampled_from([4, 8, 16]))
    G = draw(st.integers(1, 3)) if arch == "llama" else 1
    cfg = model.Config(arch=arch, vocab_size=10, dim=draw(st.sampled_from([8, 24])), n_layers=1,
                       n_heads=n_kv * G, n_kv_heads=n_kv, ffn_dim=8, max_seq_len=4096, head_dim=d,
                       attn_bias=draw(st.booleans()))
    return dict(cfg=cfg, mode=draw(st.sampled_from(SKEWS)), ratio=draw(st.sampled_from([0.25, 0.5, 1.0])),
                B=draw(st.integers(1, 3)), t=draw(st.integers(1, 9)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=attn_case())
def test_partial_query_and_speculate(c):
    """The partial query is the query times P, also when only its columns' rows of Wq are computed;
    with every column kept, speculation is the exact attention probability summed over the G heads."""
    cfg, B = c["cfg"], c["B"]
    g = torch.Generator().manual_seed(c["seed"])
    torch.manual_seed(c["seed"])
    attn = randomize(model.Attention(cfg), c["seed"])
    x = torch.randn(B, 1, cfg.dim, generator=g)
    rope = None
    if cfg.arch == "llama":
        pos = torch.randint(0, 3000, (B, 1), generator=g)
        rope = model.rope_tables(model.rope_inv_freq(cfg), pos)
    N = cfg.head_dim + 4                                     # enough calibration rows for svd
    P, A = SK.make_skew(torch.randn(N, cfg.n_heads, cfg.head_dim, generator=g),
                        torch.randn(N, cfg.n_kv_heads, cfg.head_dim, generator=g), c["mode"], c["ratio"])
    with torch.no_grad():
        q = attn.query(x, rope)                                                       # (B, H, 1, d)
        want = q.view(B, cfg.n_kv_heads, -1, cfg.head_dim) @ P[None]                   # (B, Hkv, G, m)
        qp = SK.partial_query(x, attn, rope, P)
        assert torch.allclose(qp, want, atol=1e-5)
        k = torch.randn(B, cfg.n_kv_heads, c["t"], cfg.head_dim, generator=g)
        if c["mode"] == "planes" or (c["mode"] == "none" and cfg.arch == "opt"):     # rows of Wq alone
            Wp = SK.partial_query_weight(attn.wq.weight, attn.wq.bias, P)
            qw = SK.partial_query(x, attn, rope, P, Wp)
            assert torch.allclose(qw, want, atol=1e-5), (qw - want).abs().max()
            assert torch.equal(SK.partial_keys(k, P, Wp), k @ P[None])         # a gather: exactly the product
        assert torch.equal(SK.partial_keys(k, P), k @ P[None])
        s = IG.speculate(qp, k @ P[None], cfg.head_dim ** -0.5)
        assert s.shape == (B, cfg.n_kv_heads, c["t"])
        if P.shape[-1] == cfg.head_dim:
            exact = (q.view(B, cfg.n_kv_heads, -1, cfg.head_dim) @ k.transpose(-1, -2)) * cfg.head_dim ** -0.5
            assert torch.allclose(s.exp(), exact.softmax(-1).sum(2), atol=1e-4)
        allowed = torch.rand(B, 1, c["t"], generator=g) < 0.6
        allowed[..., 0] = True
        sm = IG.speculate(qp, k @ P[None], cfg.head_dim ** -0.5, allowed)
        assert torch.isinf(sm[~allowed.expand_as(sm)]).all()                 # masked tokens get no mass
        assert torch.allclose(sm.exp().sum(-1), torch.full_like(sm[..., 0], qp.shape[2]), atol=1e-4)
        if qp.shape[2] == 1:                                         # G = 1: the score minus a constant
            raw = (qp @ (k @ P[None]).transpose(-1, -2))[:, :, 0] * cfg.head_dim ** -0.5
            d = (raw - s)[..., :1]
            assert torch.allclose(raw - s, d.expand_as(raw), atol=1e-4)


@needs_triton
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=attn_case(), per_head=st.booleans(), half=st.booleans())
def test_the_speculation_kernel_is_partial_query_and_speculate(c, per_head, half):
    """skew.SLOTS = "fused" (kernel.py; on a CPU Triton's interpreter): from the partial query before RoPE
    (x @ Wp.T + bp), the partial score kernel gives skew.partial_query's product with the partial keys,
    scaled, -inf where not allowed, per query head; summed over the G heads they are skew.speculate's
    scores, and the selection kernel picks from them the slots top_slots picks from speculate's (a float16
    model: the kernel computes in float32 where torch rounds every step to float16: equal within float16's
    precision)."""
    cfg, B, t, dev = c["cfg"], c["B"], c["t"], SLOTS_DEV
    mode = c["mode"] if c["mode"] == "planes" or (cfg.arch, c["mode"]) == ("opt", "none") else "planes"
    dtype, tol = (torch.float16, 2e-2) if half else (torch.float32, 1e-5)
    g = torch.Generator().manual_seed(c["seed"])
    attn = randomize(model.Attention(cfg), c["seed"]).to(dev, dtype)
    x = torch.randn(B, 1, cfg.dim, generator=g).to(dev, dtype)
    pos = torch.randint(0, 3000, (B, 1), generator=g)
    rope = model.rope_tables(model.rope_inv_freq(cfg), pos, dtype).to(dev) if cfg.arch == "llama" else None
    N, Hkv = cfg.head_dim + 4, cfg.n_kv_heads
    P = SK.make_skew(torch.randn(N, cfg.n_heads, cfg.head_dim, generator=g),
                     torch.randn(N, Hkv, cfg.head_dim, generator=g), mode, c["ratio"])[0].to(dev, dtype)
    Wp = SK.partial_query_weight(attn.wq.weight, attn.wq.bias, P)
    kpart = torch.randn(B, Hkv, t + 3, P.shape[-1], generator=g).to(dev, dtype)[:, :, :t]   # as the engine's
    allowed = torch.rand(B, Hkv if per_head else 1, t, generator=g) < 0.7
    allowed[..., -1] = True
    allowed = allowed.to(dev)
    scale = cfg.head_dim ** -0.5
    with torch.no_grad():
        qp = SK.partial_query(x, attn, rope, P, Wp)                                           # (B, Hkv, G, m)
        z = offload.device_kernel("partial_scores", cuda=True)(F.linear(x, Wp[0], Wp[1]), Wp[2], rope, scale,
                                                               kpart, allowed)          # (B, Hkv, G, t)
        want = (qp.float() * scale) @ kpart.float().transpose(-1, -2)
        want = torch.where(allowed[:, :, None], want, -math.inf)
        assert z.dtype == torch.float32 and torch.equal(z.isinf(), want.isinf())
        assert torch.allclose(z, want, rtol=tol, atol=tol * 10), (z - want).nan_to_num().abs().max()
        s = SK.speculate(qp, kpart, scale, allowed)                                            # (B, Hkv, t)
        assert torch.equal(SK.summed(z).isinf(), s.isinf())
        assert torch.allclose(SK.summed(z), s.float(), rtol=tol, atol=tol * 10)
        k = torch.randint(1, t + 1, (B,), generator=g)
        got = [a.cpu() for a in offload.device_kernel("top_slots", cuda=True)(z, k.to(dev), t)]
        mine = [a.cpu() for a in SK.top_slots(SK.summed(z).cpu(), k, t)]     # the same scores, torch's top-k
        assert torch.equal(got[1], mine[1]) and torch.equal(got[0][got[1]], mine[0][mine[1]])


# --- offload == full
def test_offload_equals_full(case):
    ids, logits = case.full()
    got, stats = case.generate(Policy("offload"))
    assert got == ids.tolist()
    got_logits = forced_logits(case.m, case.prompts[:1], Policy("offload"), ids)
    assert_close(got_logits, logits, 1e-5, f"{case.name} offload")
    assert stats["fetched_fraction_per_layer"] == [1.0] * case.m.cfg.n_layers
    assert stats["decode_steps"] == N_NEW - 1
    assert stats["h2d_bytes_per_step"] == expected_offload_h2d(case.m, case.prompts[:1], N_NEW)


def test_every_decode_step_attends_over_the_same_shapes(llama, monkeypatch):
    """A decode step reads every slot, the ones not yet written masked (the fetch copies only the past): its
    shapes never change, so a kernel that plans per shape (cuDNN's attention: 35 ms a step at the 7B shape
    on an H200, where `offload` read a longer past each step) plans once; prefill reads what it needs."""
    m, prompts, plain = llama.m, llama.prompts, model.attention
    for pol in (Policy("offload"), Policy("infinigen", budget=0.5), Policy("h2o", budget=0.5)):
        seen = []
        monkeypatch.setattr(model, "attention", lambda q, k, v, mask, seen=seen: seen.append(
            (q.shape[2], k.shape, mask.shape)) or plain(q, k, v, mask))
        IG.generate(m, prompts, pol, max_new=6, stop_ids=())
        decode, L = [s for s in seen if s[0] == 1], m.cfg.n_layers
        assert len(decode) == 5 * L and decode == decode[:L] * 5, pol.name       # each layer: one shape
        if pol.name == "offload":                                  # every slot: the prompt's and 6 new
            assert {k[2] for _, k, _ in decode} == {max(map(len, prompts)) + 6}


def test_a_one_token_prompt_is_calibrated_on_its_own_key(llama):
    """A one-token prompt is a prefill of T = 1 (no decode step, though its shapes are a decode step's):
    InfiniGen learns its skew from that token's key and puts that key in its partial key cache, not a slot
    of the buffer past it."""
    m = llama.m
    cache = IG.make_cache(m, Policy("infinigen", budget=0.5), 1, 8)
    IG.prefill(m, cache, torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool))
    for layer in range(cache.first, m.cfg.n_layers):
        k = cache.store.keys(layer, 1, torch.device("cpu"))                          # (B, Hkv, 1, d)
        assert k.abs().sum() > 0
        assert torch.allclose(cache.kpart[layer][:, :, :1], k @ cache.P[layer][None], atol=1e-6), layer


# --- Sparse policies at full budget == full
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_budget_equals_full(case, variant):
    pol = VARIANTS[variant]
    ids, logits = case.full()
    got, stats = case.generate(pol)
    assert got == ids.tolist(), f"{case.name} {variant}"
    assert_close(forced_logits(case.m, case.prompts[:1], pol, ids), logits, 1e-4, f"{case.name} {variant}")
    assert stats["fetched_fraction_per_layer"] == [1.0] * case.m.cfg.n_layers


@pytest.mark.parametrize("variant", ["offload", *VARIANTS])
def test_batch_of_two_equals_full(case, variant):
    pol = Policy("offload") if variant == "offload" else VARIANTS[variant]
    ids, _ = case.full(batch=True)
    got, stats = case.generate(pol, batch=True)
    assert got == ids.tolist(), f"{case.name} {variant}"
    assert stats["fetched_fraction_per_layer"] == [1.0] * case.m.cfg.n_layers


@pytest.mark.parametrize("variant", ["infinigen-planes", "oracle"])
def test_recall_is_one_at_full_budget(case, variant):
    pol = VARIANTS[variant]
    pol = dataclasses.replace(pol, measure_recall=True)
    got, stats = case.generate(pol)
    assert got == case.full()[0].tolist()
    rec = stats["recall_per_layer"]
    assert len(rec) == case.m.cfg.n_layers and rec[:pol.dense_layers] == [1.0] * pol.dense_layers
    for i, r in enumerate(rec[pol.dense_layers:], pol.dense_layers):
        assert abs(r - 1.0) <= 1e-6, f"{case.name} {variant} layer {i}: recall {r}"


@pytest.mark.parametrize("name", ["infinigen", "oracle"])
def test_layer_budget_by_prompt_keeps_the_mean(case, name):
    """Shares measured at prefill move budget between sparse layers; their mean stays the budget."""
    n = len(case.prompts[0])
    _, stats = case.generate(Policy(name, budget=0.2, layer_budget="prompt"))
    frac = stats["fetched_fraction_per_layer"][2:]
    assert 0.2 - 1e-4 <= sum(frac) / len(frac) <= 0.2 + 1 / n + 1e-4, frac
    m, ids = case.m, torch.tensor(case.prompts[:1])                       # the shares come from prefill
    cache = IG.make_cache(m, Policy(name, budget=0.2, layer_budget="prompt"), 1, ids.shape[1] + 1)
    IG.prefill(m, cache, ids, torch.ones_like(ids, dtype=torch.bool))
    IG.decode_one(m, cache, ids[:, -1])
    assert (cache.need[2:] > 0).all() and (cache.need[:2] == 0).all()
    share = cache.share
    assert torch.equal(share, SK.layer_shares(cache.need, 2)) and not torch.equal(share, torch.ones(4))


def test_policy_count_with_a_share():
    n = torch.tensor([10, 37])
    assert Policy(budget=1.0).count(n, 0.3).tolist() == [10, 37]            # budget 1 is everything, always
    assert Policy(budget=0.2).count(n, 2.0).tolist() == [4, 15]             # ceil(n * 0.4)
    assert Policy(budget=0.5).count(n, 3.0).tolist() == [10, 37]            # capped at all of them
    assert Policy(budget=4).count(n, 0.5).tolist() == [2, 2]                # a count times the share
    for huge in (2.0**63, 1e20, 1e300):                  # past a 64-bit integer: all of them, not 1 token
        assert Policy(budget=huge).count(n, 0.5).tolist() == [10, 37]
    with pytest.raises(ValueError, match="layer budget"):
        Policy(layer_budget="adaptive")


# --- Budget 0.1: what infinigen fetches, and what it moves
def test_infinigen_small_budget(case):
    n = len(case.prompts[0])
    pol = Policy("infinigen", budget=0.1, measure_recall=True, layer_budget="uniform")   # 10% per layer
    ids, stats = case.generate(pol)
    assert len(ids[0]) == N_NEW
    frac = stats["fetched_fraction_per_layer"]
    assert len(frac) == case.m.cfg.n_layers and frac[:2] == [1.0, 1.0]
    cap = 0.1 + 1 / n + 1e-4                              # ceil(0.1 * len) / len, len >= the prompt
    for i, f in enumerate(frac[2:], 2):
        assert 0 < f <= cap, f"{case.name} layer {i}: fetched {f} > {cap:.4f}"
    _, off = case.generate(Policy("offload"))
    assert 0 < stats["h2d_bytes_per_step"] < off["h2d_bytes_per_step"]
    L = case.m.cfg.n_layers                  # 2 layers copy everything, the others at most ceil(0.1 len) rows
    assert stats["h2d_bytes_per_step"] <= off["h2d_bytes_per_step"] * (2 + (L - 2) * cap) / L
    rec = stats["recall_per_layer"]
    assert rec[:2] == [1.0, 1.0]
    assert all(0.0 <= r <= 1.0 for r in rec[2:]), rec
    assert min(rec[2:]) < 0.999, f"{case.name}: budget 0.1 keeps all the attention mass? {rec}"


# --- The bounded CPU pool
@pytest.mark.parametrize("eviction", ["fifo", "lru", "counter"])
@pytest.mark.parametrize("name", ["offload", "infinigen"])
def test_bounded_pool_runs(llama, eviction, name):
    """Capacity half the context: it runs, reports its misses, and never holds more than its capacity."""
    T = len(llama.prompts[0])
    pol = Policy(name, budget=0.2, capacity=0.5, eviction=eviction)
    ids, stats = IG.generate(llama.m, llama.prompts[:1], pol, N_NEW)
    assert len(ids[0]) == N_NEW
    assert 0 < stats["pool_requests"] and 0 < stats["pool_misses"] <= stats["pool_requests"]
    cap = round(0.5 * (T + N_NEW))
    with torch.no_grad():   # the same run driven by hand, checking residency after every step
        tokens, valid = padded(llama.prompts[:1])
        cache = IG.make_cache(llama.m, pol, 1, T + N_NEW)
        pool = cache.store.pool
        assert pool is not None and pool.cap == cap
        logits = IG.prefill(llama.m, cache, tokens, valid)
        for _ in range(N_NEW - 1):
            assert int((pool.where >= 0).sum(-1).max()) <= cap
            logits = IG.decode_one(llama.m, cache, logits.argmax(-1))
        assert int((pool.where >= 0).sum(-1).max()) == cap       # full, and no more
    assert (pool.misses, pool.requests) == (stats["pool_misses"], stats["pool_requests"])


@pytest.mark.parametrize("variant", ["offload", "infinigen-planes", "h2o", "streaming"])
def test_bounded_pool_that_never_evicts_equals_full(case, variant):
    """A pool one token short of the slots is bounded (tokens are fetched through it by index), but
    decoding appends only slots - 1 tokens: no eviction, no miss, and the same tokens as `full`."""
    base = Policy("offload") if variant == "offload" else VARIANTS[variant]
    T = len(case.prompts[0])
    for eviction in ["counter"] if case.name == "default" else ["fifo", "lru", "counter"]:
        pol = dataclasses.replace(base, capacity=float(T + N_NEW - 1), eviction=eviction)
        ids, stats = case.generate(pol)
        assert ids == case.full()[0].tolist(), eviction
        assert stats["pool_misses"] == 0 and stats["pool_requests"] > 0, eviction


def test_no_new_tokens_is_no_step(llama):
    ids, s = IG.generate(llama.m, llama.prompts[:1], Policy("infinigen"), 0)
    assert ids == [[]] and s["decode_steps"] == 0 and s["h2d_bytes_per_step"] == 0


@pytest.mark.parametrize("name", ["full", "offload", "infinigen"])
def test_stats_count_the_kv_of_every_layer_and_sequence(llama, name):
    """kv_bytes: K and V of every layer for every real token of every sequence (the last sampled token is
    never fed); kv_resident_bytes: the dense layers' share, which an offloaded policy keeps on the device;
    tokens_per_s: the batch's decode tokens per second."""
    _, s = llama.generate(Policy(name), batch=True)
    cfg = llama.m.cfg
    tokens = sum(len(p) + N_NEW - 1 for p in llama.prompts)
    per_layer = 2 * cfg.n_kv_heads * cfg.head_dim * 4 * tokens                    # float32
    assert s["kv_bytes"] == cfg.n_layers * per_layer
    tokens, t = 2 * (N_NEW - 1), s["decode_s"]                  # both sequences'; t rounded to 4 digits
    assert tokens / (t + 5e-5) - 0.01 <= s["tokens_per_s"] <= tokens / (t - 5e-5) + 0.01
    dense = {"full": None, "offload": 0, "infinigen": Policy("infinigen").dense_layers}[name]
    assert s.get("kv_resident_bytes") == (None if dense is None else dense * per_layer)


def test_any_of_several_stop_tokens_ends_a_sequence(llama):
    """Generation stops at the first of any stop token (not only the smallest id), which is dropped."""
    row = llama.full()[0][0].tolist()
    k = next(j for j in range(2, N_NEW) if row[j] not in row[:j])               # a token first seen at k
    other = min(set(range(llama.m.cfg.vocab_size)) - set(row))                 # never generated
    assert other < row[k]
    ids, s = IG.generate(llama.m, llama.prompts[:1], Policy("full"), N_NEW, stop_ids=(row[k], other))
    assert ids == [row[:k]] and s["decode_steps"] == k


def test_a_batch_runs_until_its_last_sequence_stops(llama):
    """A sequence that stopped stays stopped (its later tokens are not a second chance to stop): the run
    ends at the step where the last sequence reached a stop token, not when all stop at once."""
    rows = llama.full(batch=True)[0].tolist()
    firsts = lambda stops: [next((j for j, t in enumerate(r) if t in stops), N_NEW) for r in rows]  # noqa
    stops = next((a, b) for a in rows[0][1:] for b in rows[1][1:] if len(set(firsts((a, b)))) == 2
                 and max(firsts((a, b))) < N_NEW - 1)                    # they stop at different steps
    ids, s = IG.generate(llama.m, llama.prompts, Policy("full"), N_NEW, stop_ids=stops)
    assert ids == [r[:k] for r, k in zip(rows, firsts(stops))] and s["decode_steps"] == max(firsts(stops))


@pytest.mark.parametrize("name", ["full", "infinigen"])
def test_a_run_may_fill_the_context_exactly(llama, name):
    """Prompt + new tokens == the model's context is allowed (the last token is sampled, never fed
    back); one token more is refused before any work."""
    S, p = llama.m.cfg.max_seq_len, llama.prompts[0]
    ids, s = IG.generate(llama.m, [p], Policy(name), S - len(p))
    assert len(ids[0]) == S - len(p) and s["decode_steps"] == S - len(p) - 1
    with pytest.raises(ValueError, match="exceeds the model's context"):
        IG.generate(llama.m, [p], Policy(name), S - len(p) + 1)


@pytest.mark.parametrize("name", ["offload", "infinigen"])
def test_copy_wait_per_step_counts_decode_steps_only(llama, name):
    """On a CPU the compute waits for every copy: copy_wait_s is the run's (prefill too), and
    copy_wait_per_step_s the mean over the decode steps only (what a benchmark row reports).
    No timing inequality between the two: how long the prefill's copies take is the machine's."""
    _, s = llama.generate(Policy(name, budget=0.5))
    assert s["decode_steps"] == N_NEW - 1 and s["copy_wait_s"] > 0 and s["copy_wait_per_step_s"] > 0
    assert s["copy_wait_per_step_s"] * s["decode_steps"] <= s["copy_wait_s"] + 1e-4   # rounded to 4 digits
    assert s["copy_wait_per_step_s"] <= (s["decode_s"] + 5e-5) / s["decode_steps"]   # decode_s: 4 digits


def test_the_ledger_counts_decode_waits_apart():
    ledger = offload.Ledger(2, "cpu", row_bytes=4)
    ledger.waited(1.0)                        # a prefill's wait
    ledger.decoding = True
    ledger.waited(0.25)
    ledger.waited(0.5)                        # two decode steps' waits
    assert (ledger.wait_s, ledger.decode_wait_s) == (1.75, 0.75)


@pytest.mark.parametrize("name", ["infinigen", "h2o", "streaming", "oracle"])
def test_a_last_prefill_chunk_of_one_token_is_no_decode_step(llama, name):
    """A prompt of k chunks + 1 token: its last token joins the chunk before (alone, after the first chunk,
    it would be taken for a decode step: attended sparsely, counted as a step, bytes and all)."""
    pol, (tokens, valid) = Policy(name, budget=0.1), padded(llama.prompts)
    T = tokens.shape[1]
    runs = []
    for chunk in (T - 1, 1024):
        cache = IG.make_cache(llama.m, pol, len(llama.prompts), T + 2)
        logits = IG.prefill(llama.m, cache, tokens, valid, chunk=chunk)
        ledger = cache.store.ledger
        runs.append((logits, cache.decode_steps, ledger.decode_bytes(), cache.fetched.sum().item()))
    (a, *rest_a), (b, *rest_b) = runs
    assert torch.equal(a, b) and rest_a == rest_b == [0, 0, 0.0], (rest_a, rest_b)


def test_the_layer_rule_reads_64_queries_whatever_the_chunks(llama):
    """A 100-token prompt in chunks of 64 is one chunk: a last chunk of 36 would have measured each
    layer's need on 36 queries, not the prompt's last 64 (`prompt` layer rule)."""
    g = torch.Generator().manual_seed(0)
    tokens, valid = padded([torch.randint(3, 101, (n,), generator=g).tolist() for n in (100, 90)])
    runs = []
    for chunk in (64, 1024):
        cache = IG.make_cache(llama.m, Policy("infinigen", budget=0.1), 2, 104)
        runs.append((IG.prefill(llama.m, cache, tokens, valid, chunk=chunk), cache.share))
    (a, share_a), (b, share_b) = runs
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(share_a, share_b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(share_a, torch.ones_like(share_a))                 # the rule did move the shares


@pytest.mark.parametrize("eviction", ["fifo", "lru", "counter"])
def test_pool_under_a_prefill_in_chunks(llama, eviction):
    """A left-padded batch prefilled in chunks of 8 through a bounded pool: the later chunks read the
    store by index, a mask per KV head (GQA: 6 query heads over 2), which the layer budget's measure
    reads too. With room for every token, the logits of `full`; with room for half, it runs."""
    ids, want = llama.full(batch=True)
    slots = max(map(len, llama.prompts)) + ids.shape[1]
    for cap, same in ((slots - 1, True), (slots // 2, False)):
        pol = dataclasses.replace(VARIANTS["infinigen-planes"], capacity=float(cap), eviction=eviction)
        assert pol.layer_budget == "prompt"
        got = forced_logits(llama.m, llama.prompts, pol, ids, chunk=8)
        assert got.isfinite().all()
        if same:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pool_refuses_full_oracle_and_recall():
    for kw in (dict(name="full"), dict(name="oracle"), dict(name="infinigen", measure_recall=True)):
        with pytest.raises(ValueError, match=r"no CPU pool \(--cpu-kv-capacity\) for full"):
            Policy(capacity=0.5, **kw)
    with pytest.raises(ValueError, match="--measure-recall compares a sparse policy's tokens with full"):
        Policy("full", measure_recall=True)
    for bad in (1.5, -0.5, math.inf, math.nan, 100.25):   # 1.5 tokens was 1 token, silently
        with pytest.raises(ValueError, match="a whole count of tokens"):
            Policy("infinigen", capacity=bad)
    for good in (0, 0.5, 1, 2.0, 100):
        Policy("infinigen", capacity=good)


def test_a_small_pool_fraction_keeps_a_pool():
    """A fraction of the slots that rounds to no token still bounds the store (0 would mean unbounded)."""
    m = model.Transformer(model.Config("llama", vocab_size=10, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                                       ffn_dim=8, max_seq_len=64))
    for cap, want in ((0.01, 1), (0.5, 24), (3, 3)):
        assert IG.make_cache(m, Policy("offload", capacity=cap), 1, 49).store.pool.cap == want
    assert IG.make_cache(m, Policy("offload"), 1, 49).store.pool is None


@pytest.mark.parametrize("eviction", ["fifo", "lru", "counter"])
@pytest.mark.parametrize("capacity", [1.0, 10_000.0])
def test_pool_holding_everything_never_misses(llama, eviction, capacity):
    pol = Policy("infinigen", budget=0.1, capacity=capacity, eviction=eviction)
    ids, stats = IG.generate(llama.m, llama.prompts[:1], pol, N_NEW)
    ref, _ = llama.generate(Policy("infinigen", budget=0.1))
    assert ids == ref
    assert stats.get("pool_misses", 0) == 0


# --- Known problems
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_that_turn_non_finite_mid_decode_stop_the_run(llama, monkeypatch, temperature):
    """An overflow after prefill: greedy picked token 0 of NaN logits and went on; sampling them was
    torch's multinomial error on the CPU and a device assert on CUDA. The step's one sync checks them."""
    real, calls, seen = IG.decode_one, [], []

    def decode_one(m, cache, tok):
        calls.append(tok)
        logits = real(m, cache, tok)
        return logits if len(calls) < 2 else torch.full_like(logits, float("nan"))
    monkeypatch.setattr(IG, "decode_one", decode_one)
    with pytest.raises(ValueError, match="logits are not finite"):
        IG.generate(llama.m, llama.prompts[:1], Policy("full"), 8, temperature, on_token=seen.append)
    assert len(calls) == 2 and len(seen) == 2                         # the tokens of finite logits only


def test_a_seed_makes_sampling_reproducible(llama):
    run = lambda seed: IG.generate(llama.m, llama.prompts, Policy("full"), N_NEW, 1.0, 0.9, seed)[0]  # noqa
    first = run(5)
    assert run(5) == first and run(6) != first


def test_sampling_infinite_logits_is_well_defined():
    """inf - inf is NaN in the softmax (a tiny temperature or float16 logits can reach inf): the largest
    logits win, the others cannot be sampled."""
    logits = torch.tensor([[math.inf, 0.0, -math.inf, math.inf], [1.0, -math.inf, 0.0, 5.0]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = IG.sample(logits, 1.0, 1.0, gen).tolist()
        assert a in (0, 3) and b != 1


@pytest.mark.parametrize("dense", [1, 2])
def test_calibration_covers_every_sparse_layer(llama, dense):
    """calibrate() made its own policy with 2 dense layers: with --dense-layers 1, layer 1 got no offline
    skew and was calibrated on the prompt instead, silently."""
    P = IG.calibrate(llama.m, torch.tensor([llama.prompts[0]]), Policy("infinigen", dense_layers=dense))
    assert [p is None for p in P] == [i < dense for i in range(llama.m.cfg.n_layers)]


def test_svd_skew_short_prompt(llama):
    ids, _ = IG.generate(llama.m, [llama.prompts[0][:4]], Policy("infinigen", skew="svd"), 4)
    assert len(ids[0]) == 4


def test_offload_recall_is_not_zero(llama):
    _, stats = IG.generate(llama.m, llama.prompts[:1], Policy("offload", measure_recall=True), 4)
    assert all(abs(r - 1.0) <= 1e-6 for r in stats["recall_per_layer"]), stats["recall_per_layer"]


@pytest.mark.parametrize("name", ["offload", "streaming", "h2o", "infinigen", "oracle"])
def test_a_one_token_prompt_is_a_prefill_not_a_decode_step(llama, name):
    """One prompt token goes through the model as T = 1, like a decode step, but has no past to select
    from: it must not count as a step (bytes per step, recall) nor trip the selection of a tiny past
    (streaming's sinks outnumbered the slots)."""
    pol = Policy(name, measure_recall=True, **({} if name == "offload" else {"budget": 0.5}))
    ids, stats = IG.generate(llama.m, [llama.prompts[0][:1]], pol, 3, stop_ids=())
    cfg = llama.m.cfg
    row = 2 * cfg.n_kv_heads * cfg.head_dim * 4                           # one token's K and V, one layer
    assert len(ids[0]) == 3 and all(0 < r <= 1 + 1e-6 for r in stats["recall_per_layer"])
    if name == "offload":                        # steps with 1 and 2 past tokens: 1.5 tokens per layer
        assert stats["h2d_bytes_per_step"] == cfg.n_layers * row * 3 // 2, stats["h2d_bytes_per_step"]


def test_infinigen_without_dense_layers_is_refused():
    with pytest.raises(ValueError, match="dense-layers"):
        Policy("infinigen", budget=1.0, alpha=math.inf, dense_layers=0)


# --- Random configurations
@st.composite
def configs(draw):
    arch = draw(st.sampled_from(["llama", "opt"]))
    n_kv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3)) if arch == "llama" else 1
    d = draw(st.sampled_from([8, 16]))
    H = n_kv * G
    cfg = model.Config(arch=arch, vocab_size=draw(st.integers(20, 80)), dim=H * d,
                       n_layers=draw(st.integers(2, 4)),
                       n_heads=H, n_kv_heads=n_kv, ffn_dim=draw(st.integers(8, 48)), max_seq_len=128,
                       attn_bias=arch == "opt", mlp_bias=arch == "opt",
                       pre_norm=draw(st.booleans()) or arch == "llama")
    B = draw(st.integers(1, 3))
    lens = draw(st.lists(st.integers(d, d + 10), min_size=B, max_size=B))   # >= d: svd needs G*N >= d
    name = draw(st.sampled_from(["offload", "infinigen", "h2o", "oracle", "streaming"]))
    kw = dict(budget=1.0)
    if name == "infinigen":
        kw.update(alpha=math.inf, skew=draw(st.sampled_from(SKEWS)),
                  dense_layers=draw(st.integers(1, 3)),                     # 0 is refused
                  partial_ratio=draw(st.sampled_from([0.1, 0.25, 0.5, 1.0])))
    elif name in ("h2o", "streaming"):
        kw.update(recent=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])), sinks=draw(st.integers(0, 6)))
    return dict(cfg=cfg, lens=lens, pol=Policy(name, **kw), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=configs())
def test_random_configs_equal_full(c):
    torch.manual_seed(c["seed"])
    m = randomize(model.Transformer(c["cfg"]), c["seed"]).eval()
    g = torch.Generator().manual_seed(c["seed"])
    prompts = [torch.randint(0, c["cfg"].vocab_size, (n,), generator=g).tolist() for n in c["lens"]]
    ref, _ = IG.generate(m, prompts, Policy("full"), 6)
    got, stats = IG.generate(m, prompts, c["pol"], 6)
    assert got == ref
    assert stats["fetched_fraction_per_layer"] == [1.0] * c["cfg"].n_layers


# --- Every device, dtype and gather: the equalities where the data path differs
CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}   # of max |logit|


def setups():
    """(device, dtype, gather): CPU float32 with both gathers (the kernel under Triton's interpreter) and
    float64 (the host gather: a library user's exact runs); on a GPU also float16 and bfloat16."""
    out = [("cpu", torch.float32, g) for g in ("host", "device")] + [("cpu", torch.float64, "host")]
    out += [("cuda", dt, g) for dt in (torch.float32, torch.float16, torch.bfloat16)
            for g in ("host", "device")]
    gpu = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
    kernel = [pytest.mark.skipif(not HAS_TRITON, reason="needs triton")]
    return [pytest.param(x, id=f"{x[0]}-{str(x[1])[6:]}-{x[2]}",
                         marks=(gpu if x[0] == "cuda" else []) + (kernel if x[2] == "device" else []))
            for x in out]


class Setup(Case):
    """The random GQA Llama on one device and dtype, read through one gather."""
    def __init__(self, folder, prompts, device, dtype, gather):
        m, _ = model.load(str(folder), device=device, dtype=dtype)
        super().__init__(f"llama-{device}-{dtype}-{gather}", m, prompts)
        self.gather, self.tol = gather, TOL[dtype]

    def pol(self, name, **kw):
        return Policy(name, gather=self.gather, **kw)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-setups")
    _, prompts = hf_random(folder, "llama", 1)
    return folder, prompts


@pytest.fixture(scope="module", params=setups())
def setup(request, llama_folder):
    return Setup(*llama_folder, *request.param)


def test_same_ids_forgives_only_a_tie_and_what_follows_it():
    logits = torch.tensor([[5.0, 1.0, 0.0], [2.0, 2.001, 0.0], [0.0, 0.0, 9.0]])   # step 1: a near-tie
    assert_same_ids([0, 1, 2], [0, 1, 2], logits, 1e-3, "same")
    assert_same_ids([0, 0, 1], [0, 1, 2], logits, 1e-3, "the tie went the other way, then another path")
    with pytest.raises(AssertionError):
        assert_same_ids([1, 1, 2], [0, 1, 2], logits, 1e-3, "a decided step differs")
    with pytest.raises(AssertionError):
        assert_same_ids([0, 0, 1], [0, 1, 2], logits, 1e-5, "a margin the tolerance decides")


SAME = {"offload": dict(), "infinigen": dict(budget=1.0, alpha=math.inf), "h2o": dict(budget=1.0),
        "streaming": dict(budget=1.0), "oracle": dict(budget=1.0)}


@pytest.mark.parametrize("name", list(SAME))
def test_every_setup_equals_full(setup, name):
    """offload, and every sparse policy at budget 1, equal full on this device, dtype and gather."""
    ids, logits = setup.full()
    pol = setup.pol(name, **SAME[name])
    got, stats = setup.generate(pol)
    assert_same_ids(got[0], ids[0].tolist(), logits[0], setup.tol, f"{setup.name} {name}")
    assert stats["gather"] == setup.gather
    got_logits = forced_logits(setup.m, setup.prompts[:1], pol, ids)
    assert_close(got_logits, logits, setup.tol, f"{setup.name} {name}")


# Nothing learned from the batch: the layer shares uniform, InfiniGen's skew from a text of its own (by
# default the batch's prompts together set both, one skew for every sequence as the authors' offline one is).
ALONE = {"full": {}, "offload": {}} | {name: dict(budget=0.5, layer_budget="uniform")
                                      for name in ("oracle", "h2o", "streaming", "infinigen")}


@pytest.mark.parametrize("name", list(ALONE))
def test_padded_batch_equals_each_sequence_alone(setup, name):
    """Two prompts of different lengths, left-padded into one batch, give what each gives alone: at budget
    0.5 too, where nothing is learned from the batch (not in half precision, where a near-tie of two
    tokens' scores may select either)."""
    if name not in ("full", "offload") and setup.tol > 1e-4:
        pytest.skip("a selection's near-ties in half precision")
    pol = setup.pol(name, **ALONE[name])
    part = IG.calibrate(setup.m, torch.arange(3, 43)[None] % 101, pol) if name == "infinigen" else None
    ids, _ = IG.generate(setup.m, setup.prompts, pol, N_NEW, partial=part)
    for b, prompt in enumerate(setup.prompts):
        alone, _ = IG.generate(setup.m, [prompt], pol, N_NEW, partial=part)
        ref = forced_logits(setup.m, [prompt], pol, torch.tensor(alone), partial=part)[0]       # (n, V)
        assert_same_ids(ids[b], alone[0], ref, setup.tol, f"{setup.name} {name}: sequence {b}")
        forced = torch.tensor(ids)
        forced[b] = torch.tensor(alone[0])                           # the batch reads what it read alone
        assert_close(forced_logits(setup.m, setup.prompts, pol, forced, partial=part)[b], ref, setup.tol,
                     f"{setup.name} {name} {b}")


def random_selection(layer, t0, allowed, counts, kmax, n_kv):
    """A selection that differs per KV head in what and how much it keeps: random scores, the tokens
    within 1.0 of each head's best, at most counts (B,) of them. (B, Hkv, t0) bool."""
    g = torch.Generator().manual_seed(1000 * layer + t0)
    s = torch.randn(allowed.shape[0], n_kv, t0, generator=g).to(allowed.device)
    s = F.pad(s, (0, allowed.shape[-1] - t0), value=float("-inf"))      # a decode step reads every slot
    return SK.threshold_select(s, 1.0, counts, allowed, kmax)


class RandomHeads(IG.OffloadCache):
    """A sparse policy of the engine that selects with random_selection, one layer at a time."""
    name, ahead = "random", False

    def select(self, layer, q, x, rope):
        return random_selection(layer, self.t0, self.allowed, self.counts[layer], self.kmax[layer],
                                self.cfg.n_kv_heads)


class MaskedFull(model.DenseCache):
    """The same selection applied as a mask to full attention: what RandomHeads must compute."""
    def __init__(self, m, pol, batch, slots):
        p = next(m.parameters())
        super().__init__(m.cfg, batch, slots, p.device, p.dtype)
        self.pol, self.n_kv = pol, m.cfg.n_kv_heads

    def attend(self, layer, q, k, v, x, rope):
        t0, t1 = self.t0, self.t0 + self.T
        self.k[layer, :, :, t0:t1], self.v[layer, :, :, t0:t1] = k, v
        mask = self.mask[..., :t1]
        if self.T == 1 and layer >= self.pol.dense_layers:
            counts = self.pol.count(self.lengths).to(q.device)
            sel = random_selection(layer, t0, self.valid[:, None, :t0], counts, int(counts.max()), self.n_kv)
            mask = torch.cat([sel, torch.ones_like(sel[..., :1])], -1)[:, :, None]   # (B, Hkv, 1, t1)
        return model.attention(q, self.k[layer, :, :, :t1], self.v[layer, :, :, :t1], mask)


@torch.no_grad()
def test_heads_keeping_different_counts_equal_masked_full(setup):
    """Sparse fetches where each KV head keeps its own number of rows, through the store, the gather and
    the buffers, give the logits of full attention masked to the same selection."""
    m, prompts = setup.m, setup.prompts
    pol = setup.pol("h2o", budget=0.5, layer_budget="uniform")       # settings only: RandomHeads selects
    tokens, valid = padded(prompts)
    dev = next(m.parameters()).device
    forced = torch.tensor(setup.generate(setup.pol("full"), batch=True)[0], device=dev)
    caches = [RandomHeads(m, pol, len(prompts), tokens.shape[1] + N_NEW, dev, next(m.parameters()).dtype),
              MaskedFull(m, pol, len(prompts), tokens.shape[1] + N_NEW)]
    out = [[IG.prefill(m, c, tokens.to(dev), valid)] for c in caches]
    counts = set()
    for i in range(N_NEW - 1):
        for c, o in zip(caches, out):
            o.append(IG.decode_one(m, c, forced[:, i]))
        c = caches[1]
        sel = random_selection(2, c.t0 - 1, c.valid[:, None, :c.t0 - 1], torch.full((len(prompts),), 10**6,
                               device=dev), c.t0 - 1, m.cfg.n_kv_heads)
        counts |= set(sel.sum(-1).flatten().tolist())
    assert len(counts) > 3, "the selections should keep different numbers of rows per head"
    assert_close(torch.stack(out[0], 1), torch.stack(out[1], 1), setup.tol, setup.name)


@pytest.mark.parametrize("name", ["offload", "infinigen"])
def test_bounded_pool_that_never_evicts_equals_full_everywhere(setup, name):
    T = len(setup.prompts[0])
    pol = setup.pol(name, **SAME[name], capacity=float(T + N_NEW - 1))
    ids, stats = setup.generate(pol)
    full_ids, full_logits = setup.full()
    assert_same_ids(ids[0], full_ids[0].tolist(), full_logits[0], setup.tol, f"{setup.name} {name}")
    assert stats["pool_misses"] == 0 and stats["pool_requests"] > 0


# --- No host synchronisation inside a decode step
SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


def torch_gather(src, idx, ok, dst, count=None):
    """kernel.gather_rows in plain tensor operations (its twin, which reads no value on the host)."""
    B, Hkv, n = idx.shape
    b, h = torch.arange(B)[:, None, None], torch.arange(Hkv)[None, :, None]
    cur = dst[:n].permute(1, 2, 0, 3, 4)                                        # (B, Hkv, n, 2, d)
    dst[:n] = torch.where(ok[..., None, None], src[idx, b, h], cur).permute(2, 0, 1, 3, 4)
    if count is not None:
        count += ok.sum()


@pytest.mark.parametrize("name", ["offload", "infinigen", "h2o", "streaming", "oracle"])
def test_decode_step_reads_no_device_value_on_the_host(llama, name, monkeypatch):
    """The CPU twin of CUDA's sync check: with the device gather, a decode step never asks a tensor for
    its value on the host (each such read is a sync on CUDA). Every host-side number (lengths, counts,
    bounds) is kept on the host; the kernel is replaced by its tensor twin, the CPU's bound check is off."""
    m, prompts = llama.m, llama.prompts
    pol = Policy(name, budget=0.2, gather="device")
    tokens, valid = padded(prompts)
    runs = {}
    for strict in (False, True):
        cache = IG.make_cache(m, pol, len(prompts), tokens.shape[1] + 6)
        logits = [IG.prefill(m, cache, tokens, valid)]
        with monkeypatch.context() as mp:
            if strict:
                import offload
                kernels = {"gather_rows": torch_gather, "put_rows": offload.device_kernel("put_rows")}
                mp.setattr(offload, "device_kernel", kernels.get)
                mp.setattr(SK, "CHECK_BOUNDS", False)
                for meth in SYNCS:
                    fail = lambda *a, meth=meth, **k: pytest.fail(f"Tensor.{meth} in a decode step")
                    mp.setattr(torch.Tensor, meth, fail)
            for i in range(5):
                logits.append(IG.decode_one(m, cache, torch.full((len(prompts),), 5 + i)))
        runs[strict] = torch.stack(logits)
    assert torch.equal(runs[False], runs[True])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("name", ["offload", "infinigen", "h2o", "streaming", "oracle",
                                  "infinigen slots-kernel", "infinigen slots-fused"])
def test_cuda_decode_step_never_syncs(llama_folder, name, monkeypatch):
    folder, prompts = llama_folder
    if " slots-" in name:                       # its top-k as one kernel, or its speculation (skew.SLOTS)
        name, slots = name.split(" slots-")
        monkeypatch.setattr(SK, "SLOTS", slots)
    m, _ = model.load(str(folder), device="cuda", dtype=torch.float16)
    pol = Policy(name, budget=0.2, gather="device")
    tokens, valid = padded(prompts)
    cache = IG.make_cache(m, pol, len(prompts), tokens.shape[1] + 6)
    IG.prefill(m, cache, tokens.cuda(), valid)
    nxt = torch.full((len(prompts),), 5, device="cuda")
    IG.decode_one(m, cache, nxt)                                       # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            IG.decode_one(m, cache, nxt)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not cache.store.wait_events, "timing events are recorded only when asked for"
