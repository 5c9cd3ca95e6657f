"""Small instruments the tutorial uses to look inside the engine: a cache that records what every
layer saw, a text to read, and the measures the chapters plot. Each section is included in a chapter.

Shapes: as in model.py. B = 1 here (one sequence), L layers, H heads, Hkv KV heads, t past tokens.
"""
import json
import os

import torch

import infinigen as I
import model as M
import skew as SK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Text
def text_tokens(tok, n):
    """The first n tokens of a plain English text: the GPL-3 licence where the OS ships it (Debian,
    Ubuntu), else this repository's own Python source."""
    path = "/usr/share/common-licenses/GPL-3"
    if os.path.exists(path):
        text = open(path, encoding="utf-8").read()
    else:
        text = "".join(open(os.path.join(ROOT, f), encoding="utf-8").read()
                       for f in ("model.py", "skew.py", "offload.py", "infinigen.py"))
    ids = tok.encode(text, chat=False)
    assert len(ids) >= n, f"the text has only {len(ids)} tokens"
    return ids[:n]


# --- Reading results
def results(part):
    """results/eval-<part>.json, written by `make eval` (None when that part has not been run)."""
    path = os.path.join(ROOT, "results", f"eval-{part}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def row(part, **match):
    """The first row of a results part whose policy has these settings, or None."""
    for r in (results(part) or {"rows": []})["rows"]:
        if all(str(r["policy"].get(k)) == str(v) for k, v in match.items()):
            return r
    return None


# --- Recording cache
class Recorder(M.DenseCache):
    """The `full` policy, keeping what each layer saw: its attention input x and post-RoPE q, k for
    every token, and its attention weights at every decode step (T == 1)."""
    def __init__(self, cfg, slots):
        super().__init__(cfg, 1, slots, torch.device("cpu"), torch.float32)
        L = cfg.n_layers
        self.x = [[] for _ in range(L)]       # per layer: (T, C) per forward
        self.q = [[] for _ in range(L)]       # per layer: (T, H, d) per forward
        self.kk = [[] for _ in range(L)]      # per layer: (T, Hkv, d) per forward
        self.p = [[] for _ in range(L)]       # per layer: (H, t+1) per decode step
        self.rope = []                        # per forward: RoPE tables (cos, sin) of its positions

    def attend(self, layer, q, k, v, x, rope):
        out = super().attend(layer, q, k, v, x, rope)
        if layer == 0:
            self.rope.append(rope)
        self.x[layer].append(x[0])
        self.q[layer].append(q[0].transpose(0, 1))
        self.kk[layer].append(k[0].transpose(0, 1))
        if self.T == 1:
            t1 = self.t0 + 1
            self.p[layer].append(M.attention_probs(q, self.k[layer, :, :, :t1], self.mask[..., :t1])[0, :, 0])
        return out

    def inputs(self, layer):    # every token's attention input of a layer: (N, C)
        return torch.cat(self.x[layer])

    def queries(self, layer):   # (N, H, d), after RoPE
        return torch.cat(self.q[layer])

    def keys(self, layer):      # (N, Hkv, d), after RoPE
        return torch.cat(self.kk[layer])


@torch.no_grad()
def record(model, ids, new):
    """Prefill the prompt ids, then decode `new` tokens greedily, recording everything."""
    cache = Recorder(model.cfg, len(ids) + new)
    logits = model(torch.tensor([ids]), cache)[:, -1]
    for _ in range(new):
        logits = model(logits.argmax(-1)[:, None], cache)[:, -1]
    return cache


# --- Attention coverage
def tokens_for_mass(p, mass=0.9):
    """p (..., t) attention weights -> (...,) how many of the largest weights it takes to reach mass."""
    c = p.sort(-1, descending=True).values.cumsum(-1)
    return (c < mass).sum(-1) + 1


def top_set(p, mass=0.9):
    """p (..., t) -> bool (..., t): the fewest tokens that hold `mass` of the attention."""
    n = tokens_for_mass(p, mass)
    order = p.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(p.shape[-1]).expand_as(order))
    return rank < n[..., None]


def kept_mass(p_later, chosen):
    """Attention of a later step p_later (..., t') on a set chosen earlier (..., t): (on the old set,
    on the t' - t tokens that came since). A policy that keeps the set and every new token holds the sum."""
    t = chosen.shape[-1]
    return (p_later[..., :t] * chosen).sum(-1), p_later[..., t:].sum(-1)


# --- Layer similarity
def cosine_next(rec):
    """Per layer i: the mean cosine similarity of layer i's and layer i+1's attention inputs. (L-1,)"""
    L = len(rec.x)
    return torch.stack([torch.cosine_similarity(rec.inputs(i), rec.inputs(i + 1), dim=-1).mean()
                        for i in range(L - 1)])


# --- Score prediction
@torch.no_grad()
def speculated_recall(model, rec, layer, budget, source=None, P=None, Wp=None):
    """At every recorded decode step: pick `budget` (a fraction) of the past tokens of `layer` the
    engine's way (skew.speculate, probability summed over a KV head's G heads; skew.topk_mask), from the
    attention input of layer `source` (default: the layer before) and the partial map P (default:
    all d columns). Returns the mean true attention mass on the picked tokens plus the current one."""
    source = layer - 1 if source is None else source
    cfg, attn = model.cfg, model.layers[layer].attn
    P = torch.eye(cfg.head_dim).expand(cfg.n_kv_heads, -1, -1) if P is None else P    # (Hkv, d, m)
    got = []
    for s, p in enumerate(rec.p[layer]):                       # p (H, t+1): the true attention
        t = p.shape[-1] - 1
        x, rope = rec.x[source][1 + s][None], rec.rope[1 + s]  # (1, 1, C); forward 0 was the prefill
        qp = SK.partial_query(x, attn, rope, P, Wp)                            # (1, Hkv, G, m)
        kp = rec.k[layer, :, :, :t] @ P[None]                                  # (1, Hkv, t, m)
        scores = SK.speculate(qp, kp, cfg.head_dim ** -0.5)                    # (1, Hkv, t)
        k = I.Policy(budget=budget).count(torch.tensor([t]))    # (1,): the engine's count, ceil(budget * t)
        pick = SK.topk_mask(scores, k, torch.ones(1, 1, t, dtype=torch.bool))[0]  # (Hkv, t)
        pick = pick.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, 0)         # (H, t)
        got.append(((p[:, :t] * pick).sum(-1) + p[:, t]).mean())
    return torch.stack(got).mean().item()


# --- Driving a cache
@torch.no_grad()
def run_cache(model, cache, ids, new, feed=None):
    """Prefill the prompt ids (one sequence) into `cache`, then decode `new` steps: greedily, or feeding
    the tokens `feed` (so two caches see the same text). Returns (tokens, logits (new + 1, V))."""
    logits = [model(torch.tensor([ids]), cache)[0, -1]]
    out = []
    for s in range(new):
        out.append(int(logits[-1].argmax()) if feed is None else feed[s])
        logits.append(model(torch.tensor([[out[-1]]]), cache)[0, -1])
    return out, torch.stack(logits)


# --- Naive offload
class NaiveOffload(M.Cache):
    """The `offload` policy in its plainest form: every layer's K and V live in CPU memory, and each
    layer, when it runs, copies its whole past to the device. `copied`: bytes host->device so far."""
    def __init__(self, cfg, batch, slots, device="cpu", dtype=torch.float32):
        super().__init__(batch, slots, device)
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)          # (L, B, Hkv, S, d)
        pin = torch.device(device).type == "cuda"                   # page-locked: fast, asynchronous copies
        self.k_cpu = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.v_cpu = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.dev, self.copied = device, 0

    def past(self, layer):  # the copy: every past token of the layer -> K, V (B, Hkv, t0, d), mask
        k = self.k_cpu[layer, :, :, :self.t0].to(self.dev)
        v = self.v_cpu[layer, :, :, :self.t0].to(self.dev)
        self.copied += 2 * k.numel() * k.element_size()
        return k, v, self.mask[..., :self.t0 + self.T]                             # (B, 1, T, t0+T)

    def attend(self, layer, q, k, v, x, rope):
        k_past, v_past, mask = self.past(layer)       # the layer waits for this copy: nothing overlaps
        out = M.attention(q, torch.cat([k_past, k], 2), torch.cat([v_past, v], 2), mask)
        t0, t1 = self.t0, self.t0 + self.T
        self.k_cpu[layer, :, :, t0:t1], self.v_cpu[layer, :, :, t0:t1] = k.cpu(), v.cpu()   # append
        return out


# --- Layer-ahead sparse fetch
class LayerAhead(NaiveOffload):
    """InfiniGen's decode step, plainly: while layer i runs, its input x picks layer i+1's tokens
    (partial query against the partial key cache, within alpha of the best, at most pol.count), and
    only their rows are copied, before layer i+1 starts. The first pol.dense_layers layers copy all.
    P: per layer the partial map (Hkv, d, m), e.g. from infinigen.calibrate on the prompt."""
    def __init__(self, model, pol, P, batch, slots):
        super().__init__(model.cfg, batch, slots)
        self.model, self.pol, self.P, self.ahead = model, pol, P, {}
        w = [(b.attn.wq.weight, b.attn.wq.bias) for b in model.layers]            # planes: rows of Wq
        self.Wp = [SK.partial_query_weight(*w[i], p) if p is not None and pol.skew == "planes" else None
                   for i, p in enumerate(P)]
        self.kpart = [None if p is None else torch.zeros(batch, p.shape[0], slots, p.shape[2]) for p in P]

    def attend(self, layer, q, k, v, x, rope):
        i, t0 = layer + 1, self.t0                                   # speculate layer i+1 from this x
        if self.T == 1 and self.pol.dense_layers <= i < len(self.P):
            allowed = self.valid[:, None, :t0]                                       # (B, 1, t0)
            qp = SK.partial_query(x, self.model.layers[i].attn, rope, self.P[i], self.Wp[i])
            s = SK.speculate(qp, self.kpart[i][:, :, :t0], q.shape[-1] ** -0.5, allowed)   # (B, Hkv, t0)
            cap = self.pol.count(self.lengths)                                        # (B,) tokens
            sel = SK.threshold_select(s, self.pol.alpha, cap, allowed, mean=self.pol.head_count == "mean")
            idx, ok = SK.to_index(sel)                                               # (B, Hkv, n)
            rows = lambda c: c[i, :, :, :t0].gather(2, idx[..., None].expand(-1, -1, -1, c.shape[-1]))
            self.ahead[i] = rows(self.k_cpu).to(self.dev), rows(self.v_cpu).to(self.dev), ok  # the prefetch
            self.copied += 2 * int(ok.sum()) * k.shape[-1] * k.element_size()    # padding rows: not sent
        if self.kpart[layer] is not None:                          # the partial key cache grows
            self.kpart[layer][:, :, t0:t0 + self.T] = k @ self.P[layer][None]
        return super().attend(layer, q, k, v, x, rope)

    def past(self, layer):  # the rows fetched one layer ahead, if any, with a mask per KV head
        if layer not in self.ahead:
            return super().past(layer)
        k, v, ok = self.ahead.pop(layer)
        new = self.mask[:, :, :, self.t0:self.t0 + 1].expand(-1, ok.shape[1], -1, -1)   # (B, Hkv, 1, 1)
        return k, v, torch.cat([ok[:, :, None], new], -1)                            # (B, Hkv, 1, n+1)
