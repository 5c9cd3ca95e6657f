"""Solutions to the tutorial's exercises: one function per exercise, exNN_k = chapter NN, exercise k.

tests/test_tutorial.py runs each one and checks its answer against the engine (a ledger, a module, a
Config, a cache's own state), so a solution that drifts from the engine fails `make test`. Each runs in
seconds on a CPU. `model`, `tok`: the default model and tokenizer; `rec`: a lab.Recorder run.
"""
import math

import torch

import infinigen as I
import model as M
import skew as SK
from offload import KVStore, Pool, kv_rows
from tutorial import lab


# --- Chapter 1: overview
def ex01_1(model):
    """Bytes host->device per decode step of Policy("infinigen", layer_budget="uniform"): a 300-token
    prompt, 5 new tokens, so 4 decode steps at pasts 300..303. Dense layers: 0 bytes (resident); each
    sparse layer: count(t) rows per KV head, each K and V in float32 plus an 8-byte position."""
    cfg, pol = model.cfg, I.Policy("infinigen", layer_budget="uniform")
    row = 2 * cfg.head_dim * 4 + 8
    sparse, steps = cfg.n_layers - pol.dense_layers, 4
    total = sum(int(pol.count([300 + s])[0]) * cfg.n_kv_heads * row * sparse for s in range(steps))
    return round(total / steps)


def ex01_2():
    """The settings --paper changes from the engine's defaults (the budget is 0.2 in both)."""
    d = I.Policy()
    return {k: v for k, v in I.PAPER.items() if getattr(d, k) != v}


# --- Chapter 2: a decoder
def ex02_1(cfg):
    """RoPE at position 1000 of a random query: (largest relative change of a plane's length,
    largest relative change of one dimension's magnitude). The first is zero up to rounding."""
    q = torch.randn(1, 1, 1, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    r = M.apply_rope(q, *M.rope_tables(M.rope_inv_freq(cfg), torch.tensor([[1000]])))
    half = cfg.head_dim // 2
    plane = lambda x: (x[..., :half] ** 2 + x[..., half:] ** 2).sqrt()
    return (((plane(r) - plane(q)).abs() / plane(q)).max().item(),
            ((r.abs() - q.abs()).abs() / q.abs()).max().item())


def ex02_2(cfg):
    """Parameters of one Block from the Config: Wq and Wo (C x H*d), Wk and Wv (C x Hkv*d), the SwiGLU
    MLP (gate, up, down: C x ffn each), two norm weights (C each), and biases where the model has them."""
    C, hd, kvd = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attn = 2 * C * hd + 2 * C * kvd + (hd + 2 * kvd + C) * cfg.attn_bias
    mlp = 3 * C * cfg.ffn_dim + (2 * cfg.ffn_dim + C) * cfg.mlp_bias
    return attn + mlp + 2 * C


# --- Chapter 3: the KV cache
def ex03_1(cfg, slots=4096):
    """Bytes of DenseCache for one sequence: K and V, (L, B, Hkv, S, d), 4 bytes a number."""
    return 2 * cfg.n_layers * 1 * cfg.n_kv_heads * slots * cfg.head_dim * 4


@torch.no_grad()
def ex03_2(model, tok):
    """A left-padded batch of two prompts against each alone: the largest |difference| of the last
    logits, relative to the largest |logit|."""
    prompts = [tok.encode("Name three primary colours."), tok.encode("Why is the sky blue? One line.")]
    T = max(len(p) for p in prompts)
    tokens, valid = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):], valid[b, T - len(p):] = torch.tensor(p), True
    both = model(tokens, M.DenseCache(model.cfg, 2, T, "cpu", torch.float32), valid)[:, -1]
    alone = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    return ((both - alone).abs().max() / alone.abs().max()).item()


# --- Chapter 4: the memory wall
def ex04_1():
    """Llama-3-8B, fp16: 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes."""
    return 2 * 32 * 8 * 128 * 2


def ex04_2(memory=80e9, context=4096):
    """The largest batch of Llama-2-7B at `context` tokens whose fp16 weights and KV cache fit."""
    C, L, V, ffn = 4096, 32, 32000, 11008
    params = 2 * V * C + L * (4 * C * C + 3 * C * ffn + 2 * C) + C      # embed, lm_head, blocks, norm
    kv_per_sequence = 2 * L * 32 * 128 * 2 * context
    return int((memory - 2 * params) // kv_per_sequence)


# --- Chapter 5: offloading
class DecodeCounting(lab.NaiveOffload):
    """NaiveOffload counting the bytes of decode steps only."""
    def past(self, layer):
        before = self.copied
        out = super().past(layer)
        if self.T > 1:
            self.copied = before
        return out


def ex05_1(model, tok):
    """(naive bytes per decode step, the engine's offload ledger) for a 100-token prompt, 6 new tokens."""
    ids = lab.text_tokens(tok, 100)
    naive = DecodeCounting(model.cfg, 1, len(ids) + 6)
    lab.run_cache(model, naive, ids, 5)                       # 5 decode steps, as generate's 6 tokens make
    _, st = I.generate(model, [ids], I.Policy("offload"), max_new=6)
    return round(naive.copied / 5), st["h2d_bytes_per_step"]


def ex05_2():
    """The toy store (d = 4, float32), 4 rows: host gather rows + 8-byte positions; device gather rows."""
    row = 2 * 4 * 4
    return 4 * (row + 8), 4 * row


# --- Chapter 6: attention is sparse
def ex06_1(rec):
    """Per layer, at the last recorded step: (mass on the most recent 10% of the past, mass on the best
    10%), mean over heads."""
    out = []
    for p in (ps[-1] for ps in rec.p):                       # (H, t+1)
        t = p.shape[-1] - 1
        k = max(1, round(0.1 * t))
        out.append((p[:, t - k:t].sum(-1).mean().item(), p[:, :t].topk(k, -1).values.sum(-1).mean().item()))
    return out


def ex06_2(rec):
    """Per layer: the median share of the past that holds 99% of a head's attention."""
    return [torch.cat([lab.tokens_for_mass(p, 0.99).float() / p.shape[-1] for p in ps]).median().item()
            for ps in rec.p]


# --- Chapter 7: consecutive layers
def ex07_1(model, rec, layers=(4, 10, 20)):
    """{layer: (recall speculated from layer i-1, from layer i-2)} at budget 0.1."""
    return {i: (lab.speculated_recall(model, rec, i, 0.1),
                lab.speculated_recall(model, rec, i, 0.1, source=i - 2))
            for i in layers}


def ex07_2(model, tok):
    """With one dense layer: (recall of layer 1, mean recall of layers 2..) for a 128-token prompt."""
    pol = I.Policy("infinigen", dense_layers=1, measure_recall=True)
    _, st = I.generate(model, [lab.text_tokens(tok, 128)], pol, max_new=5, stop_ids=())
    r = st["recall_per_layer"]
    return r[1], sum(r[2:]) / len(r[2:])


# --- Chapter 8: skewing
@torch.no_grad()
def ex08_1(model, rec, layer=10, m=13):
    """Layer 10's queries before RoPE: (energy share of the best m plain columns, of the best m after
    the SVD skew). The SVD's first m directions hold the most energy any m orthonormal directions can."""
    cfg = model.cfg
    pre = model.layers[layer].attn.wq(rec.inputs(layer)).view(-1, cfg.n_heads, cfg.head_dim)
    g = SK.group_queries(pre, cfg.n_kv_heads)                                # (Hkv, G*N, d)
    share = lambda e: (e.sort(-1, descending=True).values[:, :m].sum(-1) / e.sum(-1)).mean().item()
    return share(g.pow(2).mean(1)), share((g @ SK.svd_skew(g)).pow(2).mean(1))


@torch.no_grad()
def ex08_2(model, rec, layer=10):
    """(largest relative change RoPE makes to a column's energy, to a plane's energy), layer 10."""
    cfg = model.cfg
    pre = model.layers[layer].attn.wq(rec.inputs(layer)).view(-1, cfg.n_heads, cfg.head_dim)
    post = rec.queries(layer)
    e_pre, e_post = pre.pow(2).mean(0), post.pow(2).mean(0)                  # (H, d)
    half = cfg.head_dim // 2
    plane = lambda e: e[:, :half] + e[:, half:]
    return (((e_post - e_pre).abs() / e_pre).max().item(),
            ((plane(e_post) - plane(e_pre)).abs() / plane(e_pre)).max().item())


# --- Chapter 9: partial weights
def ex09_1(cfg):
    """The partial key cache as a fraction of the whole KV cache: sparse layers x m columns of keys,
    against all layers x 2d (keys and values): (defaults, --paper)."""
    out = []
    for pol in (I.Policy("infinigen"), I.Policy.paper()):
        m = SK.n_columns(pol.partial_ratio, cfg.head_dim, pol.skew == "planes")
        out.append((cfg.n_layers - pol.dense_layers) * m / (cfg.n_layers * 2 * cfg.head_dim))
    return tuple(out)


@torch.no_grad()
def ex09_2(model, rec, layer=10):
    """Single columns (mode none) through the rows of Wq and RoPE alone, against the true partial query;
    the same for whole planes: (largest |difference| relative to the largest |value|, none and planes).
    RoPE pairs dim j with dim j + d/2: a kept column whose partner was dropped cannot be rotated."""
    q, k = rec.queries(layer), rec.keys(layer)
    attn, x, rope = model.layers[layer].attn, rec.x[layer][-1][None], rec.rope[-1]
    out = []
    for mode in ("none", "planes"):
        P, _ = SK.make_skew(q, k, mode, 0.5)
        Wp = SK.partial_query_weight(attn.wq.weight, attn.wq.bias, P)
        fast, true = SK.partial_query(x, attn, rope, P, Wp), SK.partial_query(x, attn, rope, P)
        out.append(((fast - true).abs().max() / true.abs().max()).item())
    return tuple(out)


# --- Chapter 10: speculation
def ex10_1():
    """The positions' share of the host gather's bytes: (default model, float32, d 64; Llama-2-7B, fp16,
    d 128)."""
    return 8 / (2 * 64 * 4 + 8), 8 / (2 * 128 * 2 + 8)


def ex10_2(s, alpha, k):
    """s (Hkv, t) scores: per head, the tokens within alpha of the best, at most k, by a plain loop."""
    out = torch.zeros(s.shape, dtype=torch.bool)
    for h in range(s.shape[0]):
        order = sorted(range(s.shape[1]), key=lambda j: -float(s[h, j]))
        best = float(s[h, order[0]])
        for j in order[:k]:
            if float(s[h, j]) >= best - alpha:
                out[h, j] = True
    return out


# --- Chapter 11: a layer-ahead sparse fetch
def ex11_1(model, tok):
    """The engine's h2d_bytes_per_step (defaults, layers uniform; a 150-token prompt, 6 decode steps),
    from LayerAhead alone: its sparse rows, each with an 8-byte position; the dense layers copy nothing."""
    pol, cfg = I.Policy("infinigen", layer_budget="uniform"), model.cfg
    ids, steps = lab.text_tokens(tok, 150), 6
    mine = lab.LayerAhead(model, pol, I.calibrate(model, torch.tensor([ids]), pol), 1, len(ids) + steps + 1)
    lab.run_cache(model, mine, ids, steps)
    row = 2 * cfg.head_dim * 4
    dense = pol.dense_layers * cfg.n_kv_heads * row * sum(len(ids) + s for s in range(steps))
    return round((mine.copied - dense) // row * (row + 8) / steps)


def ex11_2(model, tok):
    """Budget 1: (LayerAhead's greedy tokens, full's) for a 100-token prompt, 8 new tokens."""
    pol, ids = I.Policy("infinigen", budget=1.0, layer_budget="uniform"), lab.text_tokens(tok, 100)
    mine = lab.LayerAhead(model, pol, I.calibrate(model, torch.tensor([ids]), pol), 1, len(ids) + 8)
    out, _ = lab.run_cache(model, mine, ids, 8)
    full, _ = I.generate(model, [ids], I.Policy("full"), max_new=8, stop_ids=())
    return out, full[0]


# --- Chapter 12: the engine
def ex12_1(model, tok):
    """After a 200-token prefill: tokens per KV head summed over the sparse layers, (prompt, uniform).
    The shares have mean 1, so the sums differ only by the rounding up of each layer's count."""
    ids, sums = lab.text_tokens(tok, 200), []
    for rule in ("prompt", "uniform"):
        cache = I.make_cache(model, I.Policy("infinigen", layer_budget=rule), 1, len(ids) + 1)
        I.prefill(model, cache, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
        cache.begin(1)                                           # a decode step's counts, at a past of 200
        sums.append(sum(cache.kmax[cache.pol.dense_layers:]))
    return tuple(sums)


def ex12_2(model, tok):
    """One decode step of infinigen: (layers planned, layers whose attend took a fetch)."""
    ids = lab.text_tokens(tok, 100)
    cache = I.make_cache(model, I.Policy("infinigen"), 1, len(ids) + 1)
    I.prefill(model, cache, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
    planned, took, now = [], [], [None]
    plan, attend, take = cache.plan, cache.attend, cache.store.take
    cache.plan = lambda layer, *a, **k: (planned.append(layer), plan(layer, *a, **k))[1]
    cache.attend = lambda layer, *a: (now.__setitem__(0, layer), attend(layer, *a))[1]
    cache.store.take = lambda h: (took.append(now[0]), take(h))[1]
    I.decode_one(model, cache, torch.tensor([ids[-1]]))
    return planned, took


# --- Chapter 13: bounded memory
def ex13_1():
    """The toy pool, token 3 fetched four times too: the residents after tokens 4 and 5, per policy.
    counter keeps [0, 3, 4, 5] as before: the older half (by token age) is {0, 1}, then {0, 2}, so
    token 3's count is never consulted; lru now keeps 3 (fetched last) and drops 2, then 0."""
    out = {}
    for policy in ("fifo", "lru", "counter"):
        pool = Pool(n_layers=1, batch=1, tokens=8, capacity=4, policy=policy)
        for t in range(4):
            pool.admit(0, t, torch.ones(1, 1, dtype=torch.bool))
        for tokens in ((0, 2), (0, 2), (0,), (0,), (1,), (3,), (3,), (3,), (3,)):
            idx = torch.tensor([[list(tokens)]])
            pool.touch(0, idx, torch.ones_like(idx, dtype=torch.bool))
        for t in (4, 5):
            pool.admit(0, t, torch.ones(1, 1, dtype=torch.bool))
        out[policy] = sorted(int(x) for x in pool.owner[0, 0])
    return out


def ex13_2(cfg):
    """pool_requests for infinigen (uniform, budget 0.2, alpha inf, capacity 100), a 96-token prompt and
    6 new tokens: the prefill fetches nothing (its one chunk has no past); each of the 5 decode steps asks
    count(t) tokens per KV head in each of the 28 sparse layers (the dense layers are not in the pool)."""
    pol = I.Policy("infinigen", layer_budget="uniform")
    per_step = [int(pol.count([96 + s])[0]) for s in range(5)]
    return sum(per_step) * cfg.n_kv_heads * (cfg.n_layers - pol.dense_layers)


# --- Chapter 14: accuracy
def ex14_1():
    """From results/eval-alpha.json: [(alpha, share of the sparse layers' tokens fetched, budget)]."""
    return [(r["policy"]["alpha"], r["sparse_fraction"], r["policy"]["budget"])
            for r in lab.results("alpha")["rows"]]


# --- Chapter 15: the paper and speed
def ex15_1(bandwidth=55e9):
    """Llama-2-7B, batch 8, 4096 tokens, fp16, budget 0.2, layers 0 and 1 resident, 8-byte positions:
    (bytes per step, PCIe floor in ms, offload's floor in ms)."""
    L, Hkv, d, B, t = 32, 32, 128, 8, 4096
    rows = (L - 2) * B * Hkv * math.ceil(0.2 * t)
    sparse = rows * (2 * d * 2 + 8)
    everything = L * B * Hkv * t * 2 * d * 2
    return sparse, sparse / bandwidth * 1e3, everything / bandwidth * 1e3


# --- Chapter 16: the baselines
def ex16_1():
    """StreamingLLM, a 20-token past, budget 8 tokens, 4 sinks: the sinks and the 4 most recent."""
    return list(range(4)) + list(range(20 - (8 - 4), 20))


def ex16_2(model, tok):
    """h2o at budget 1 against full: (h2o's tokens, full's), a 100-token prompt, 8 new tokens."""
    ids = lab.text_tokens(tok, 100)
    h2o, _ = I.generate(model, [ids], I.Policy("h2o", budget=1.0), max_new=8, stop_ids=())
    full, _ = I.generate(model, [ids], I.Policy("full"), max_new=8, stop_ids=())
    return h2o[0], full[0]


# --- Chapter 17: the CUDA bookkeeping
def ex17_1():
    """The device gather into a buffer of markers: (destination rows changed, rows wanted)."""
    g = torch.Generator().manual_seed(1)
    store = KVStore(n_layers=1, batch=2, slots=8, n_kv=3, head_dim=4, device=torch.device("cpu"),
                    dtype=torch.float32, gather="device")
    store.append(0, 0, kv_rows(torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)))
    idx, ok = torch.randint(0, 6, (2, 3, 4), generator=g), torch.rand(2, 3, 4, generator=g) > 0.3
    store.buf[0].fill_(-99.0)
    store.take(store.fetch(0, t0=6, idx=idx, ok=ok))
    changed = (store.buf[0] != -99.0).flatten(3).any(-1)                    # (S, B, Hkv)
    return int(changed.sum()), int(ok.sum())


def ex17_2(n=410, B=32, Hkv=3, block=32, sms=132, per_sm=0.25):
    """(programs the kernel launches on a GPU of `sms` SMs, loop steps each takes (STEPS: a block of rows
    each, those past the end masked), bytes each row moves for the default model in float16)."""
    blocks = math.ceil(n * B * Hkv / block)                             # 1230 blocks of 32 rows
    grid = min(blocks, round(per_sm * sms))                             # 33 programs
    steps = 2 ** math.ceil(math.log2(math.ceil(blocks / grid)))         # 37-38 blocks a program -> 64 steps
    return grid, steps, 2 * 64 * 2


# --- Chapter 18: CUDA graphs
def ex18_1(model, tok):
    """Tensor operations in one `full` decode step at batch 1 and batch 4 (a 60-token prompt)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    ids, counts = lab.text_tokens(tok, 60), []
    for B in (1, 4):
        cache = I.make_cache(model, I.Policy("full"), B, len(ids) + 2)
        I.prefill(model, cache, torch.tensor([ids] * B), torch.ones(B, len(ids), dtype=torch.bool))
        with Count() as c:
            I.decode_one(model, cache, torch.tensor([ids[-1]] * B))
        counts.append(c.n)
    return tuple(counts)


def ex18_2(model):
    """replayable() of four runs: offload; infinigen, host gather; infinigen, pool at half the context;
    h2o, device gather."""
    runs = {"offload": I.Policy("offload"), "host": I.Policy("infinigen", gather="host"),
            "pool": I.Policy("infinigen", capacity=0.5, gather="device"),
            "h2o": I.Policy("h2o", gather="device")}
    return {k: I.replayable(I.make_cache(model, pol, 1, 64)) for k, pol in runs.items()}
