"""Small instruments the tutorial uses to look inside the engine: a cache that records what every
layer saw, a text to read, and the measures the chapters plot. Each section is included in a chapter.

Shapes: as in model.py. B = 1 here (one sequence), L layers, H heads, Hkv KV heads, t past tokens.
"""
import os

import torch

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
            self.p[layer].append(M.attention_probs(q, self.k[layer, :, :, :t1], self.mask)[0, :, 0])
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
    """How much of a later step's attention p_later (..., t') falls on a set chosen earlier (..., t)."""
    return (p_later[..., :chosen.shape[-1]] * chosen).sum(-1)


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
        k = torch.tensor([max(1, round(budget * t))])
        pick = SK.topk_mask(scores, k, torch.ones(1, 1, t, dtype=torch.bool))[0]  # (Hkv, t)
        pick = pick.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, 0)         # (H, t)
        got.append(((p[:, :t] * pick).sum(-1) + p[:, t]).mean())
    return torch.stack(got).mean().item()
