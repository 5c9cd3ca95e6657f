"""InfiniGen: the policies and the decode loop (the command line is cli.py). Every policy is a cache
object handed to the one model in model.py:
  full      K, V of every layer stay on the device (model.DenseCache).
  offload   K, V in CPU memory; every layer's whole past copied each step, layer i+1's while i computes.
  infinigen layers 0..dense-1 whole on the device; while layer i runs, layer i+1's scores are speculated
            from layer i's attention input, partial query weight and partial key cache; the tokens
            within alpha of the best (capped by the budget) are prefetched from CPU memory.
  h2o       heavy hitters by accumulated attention plus a recent window; evicted for good.
  streaming attention sinks plus a recent window.   oracle  the true top-k (evaluation only).
Shapes: B batch, T new tokens, S slots, H heads, Hkv KV heads, G = H // Hkv, d head dim, n fetched.
"""
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import model as M
import skew as SK
from model import Tok  # noqa: F401  (re-exported for scripts: I.Tok)
from offload import GATHERS, KVStore, Pool, preflight, stats_of
from skew import partial_query, speculate, threshold_select, to_index, topk_mask

POLICIES = ("full", "offload", "infinigen", "h2o", "streaming", "oracle")


# --- Policy settings
@dataclass
class Policy:
    name: str = "full"
    budget: float = 0.2          # past tokens per sparse layer: a fraction (<= 1) or a count (> 1)
    alpha: float = math.inf      # infinigen: keep tokens whose speculated score >= max - alpha
    partial_ratio: float = 0.5   # infinigen: fraction of the d columns kept in the partial key cache
    skew: str = "planes"         # none | svd | planes
    dense_layers: int = 2        # layers kept whole on the device (sparse policies)
    recent: float = 0.5          # h2o / streaming: share of the budget given to the recent window
    sinks: int = 4               # streaming: first tokens always kept
    capacity: float = 0          # CPU pool: tokens per sequence (> 1) or fraction of the context; 0 = all
    eviction: str = "counter"    # fifo | lru | counter
    layer_budget: str = "prompt"  # prompt: sparse layers share the budget by their need at prefill | uniform
    measure_recall: bool = False
    gather: str = "auto"         # host | device (a kernel reads pinned memory) | auto: device on CUDA

    def __post_init__(self):  # every impossible setting, refused with one line
        for ok, why in [
            (self.name in POLICIES, f"unknown policy {self.name!r} (choose from {', '.join(POLICIES)})"),
            (self.budget > 0 and math.isfinite(self.budget),
             f"impossible budget {self.budget}: give a fraction in (0, 1] or a token count > 1"),
            (0 < self.partial_ratio <= 1, f"partial ratio {self.partial_ratio} must be in (0, 1]"),
            (self.alpha >= 0, f"alpha {self.alpha} must be >= 0 (inf: no threshold, the budget decides)"),
            (0 <= self.recent <= 1, f"recent share {self.recent} must be in [0, 1]"),
            (0 <= self.capacity < math.inf,
             f"CPU KV capacity {self.capacity} must be finite and >= 0 (0: unbounded)"),
            (self.dense_layers >= (self.name == "infinigen"), "--dense-layers must be >= 0, and >= 1 for "
             "infinigen: it speculates layer i+1 from layer i, so layer 0 is dense"),
            (not self.capacity or (self.name != "oracle" and not self.measure_recall),
             "oracle and --measure-recall read every key: they need an unbounded CPU store"),
            (self.layer_budget in ("uniform", "prompt"),
             f"unknown layer budget {self.layer_budget!r} (uniform or prompt)"),
            (self.skew in SK.MODES, f"unknown skew mode {self.skew!r} (choose from {', '.join(SK.MODES)})"),
            (self.gather in GATHERS, f"unknown gather {self.gather!r} (choose from {', '.join(GATHERS)})")]:
            if not ok:
                raise ValueError(why)

    @classmethod
    def paper(cls, name="infinigen", **over):
        """The authors' settings (PAPER), with `over` on top: the `--paper` preset."""
        return cls(name, **{**PAPER, **over})

    def count(self, n, share=1.0):
        """Tokens to keep of n past tokens (B,) at this share of the budget (a float, or (L, 1) per layer):
        (B,) or (L, B). Host arithmetic (numpy), float32 products as a device would compute them."""
        n, share = np.asarray(n), np.asarray(share, dtype=np.float64)
        if self.budget <= 1:   # budget 1: everything, always
            f = np.ones_like(share) if self.budget == 1 else np.minimum(self.budget * share, 1.0)
            k = np.ceil(n.astype(np.float32) * f.astype(np.float32))
        else:
            k = np.trunc(self.budget * share) + np.zeros(n.shape)
        return np.minimum(np.maximum(k.astype(np.int64), 1), n)


# The authors' choices (their speed-up scripts, speedup/scripts/*/run.sh of snu-comparch/InfiniGen):
# SVD skew (offline there; calibrated on the prompt here unless --calib), partial ratio 0.2, alpha 4,
# budget 0.2 of the context, the same for every sparse layer.
PAPER = dict(skew="svd", partial_ratio=0.2, alpha=4.0, budget=0.2, layer_budget="uniform")


# --- Offloaded caches
class OffloadCache(M.Cache):
    """K, V of layers `first`.. in the CPU store, each attending over what its fetch brought plus the
    new tokens; the layers before `first` (the sparse policies' dense layers) stay whole on the device.
    Alone it is the `offload` policy; subclasses choose `select(layer, q, x, rope)` (at most
    `kmax[layer]` tokens per KV head), and `ahead` says whether that runs one layer early or at the layer."""
    name, ahead = "offload", True

    def __init__(self, model, pol: Policy, batch, slots, device, dtype):
        super().__init__(batch, slots, device)
        cfg = self.cfg = model.cfg
        self.model, self.pol, self.dev = model, pol, device
        self.G, self.scale = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim ** -0.5
        self.first = 0 if self.name == "offload" else min(pol.dense_layers, cfg.n_layers)
        res = (self.first, batch, cfg.n_kv_heads, slots, cfg.head_dim)          # (first, B, Hkv, S, d)
        elt = torch.tensor([], dtype=dtype).element_size()
        extra = 2 * math.prod(res) * elt + self.device_bytes(batch, slots, elt)
        cap = pol.capacity if pol.capacity > 1 else round(pol.capacity * slots)
        n_off = cfg.n_layers - self.first
        pool = Pool(n_off, batch, slots, int(cap), pol.eviction) if 0 < cap < slots else None
        self.store = KVStore(cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim, device, dtype, pool,
                             pol.gather, self.first, extra)
        self.rk = torch.zeros(res, device=device, dtype=dtype)                 # resident layers' K, V
        self.rv = torch.zeros(res, device=device, dtype=dtype)
        self.fetched = torch.zeros(cfg.n_layers, device=device)          # sum over steps of fraction fetched
        self.recall = torch.zeros(cfg.n_layers, dtype=torch.float64)
        self.decode_steps, self.handles, self.idx = 0, {}, {}
        self.need, self.share = torch.zeros(cfg.n_layers), np.ones(cfg.n_layers)        # (L,) on the host

    def device_bytes(self, batch, slots, elt):  # what a policy keeps on the device besides K, V
        return 0

    def sparse(self, layer):
        return self.T == 1 and layer >= self.pol.dense_layers and self.name != "offload"

    def begin(self, T, valid_new=None):
        pos = super().begin(T, valid_new)
        self.allowed = self.valid[:, None, :self.t0]                                # (B, 1, t0) past tokens
        self.store.ledger.decoding = self.T == 1
        counts = self.pol.count(self.lengths, self.share[:, None])                  # (L, B) on the host
        self.kmax = counts.max(1).tolist()                       # per layer: a bound the host knows
        counts = torch.from_numpy(counts)
        self.counts = (counts.pin_memory() if self.store.cuda else counts).to(self.dev, non_blocking=True)
        if self.ahead and self.first == 0:
            self.issue(0, self.plan(0))
        return pos

    # --- Plan and issue
    def plan(self, layer, q=None, x=None, rope=None):
        """What `layer` needs of the past: None (all, one block) or (idx, ok, event) per KV head; for
        the host gather they are already on their way to host memory, and the event says when."""
        if self.t0 == 0 or (not self.sparse(layer) and self.store.pool is None):
            return None
        if self.sparse(layer):
            sel, n = self.select(layer, q, x, rope) & self.allowed, self.kmax[layer]   # (B, Hkv, t0)
        else:  # dense, but a bounded pool scatters tokens: fetch every past token by index
            sel, n = self.allowed.expand(-1, self.cfg.n_kv_heads, -1), self.t0
        idx, ok = to_index(sel, n)                               # n: a bound, no device sync
        self.idx[layer] = idx
        if self.store.gather == "host":                                          # pinned, async on CUDA
            idx, ok = idx.to("cpu", non_blocking=True), ok.to("cpu", non_blocking=True)
        ev = torch.cuda.Event() if self.store.cuda else None
        if ev:
            ev.record()
        return idx, ok, ev

    def issue(self, layer, plan):
        """Start copying what `plan` chose for `layer`."""
        if plan is None:
            self.handles[layer] = self.store.fetch(layer, self.t0)
            return
        idx, ok, ev = plan
        if ev is not None and self.store.gather == "host":
            ev.synchronize()                                # the indices only, not the queued attention
        self.handles[layer] = self.store.fetch(layer, self.t0, idx, ok, after=ev)

    # --- Attend
    def attend(self, layer, q, k, v, x, rope):
        ahead = self.ahead and self.first <= layer + 1 < self.cfg.n_layers
        nxt = self.plan(layer + 1, x=x, rope=rope) if ahead else None   # speculate layer i+1 first
        t0, T = self.t0, self.T
        if layer < self.first:                              # resident, as in the full policy
            self.rk[layer, :, :, t0:t0 + T], self.rv[layer, :, :, t0:t0 + T] = k, v
            out = M.attention(q, self.rk[layer, :, :, :t0 + T], self.rv[layer, :, :, :t0 + T], self.mask)
            if ahead:
                self.issue(layer + 1, nxt)
            return out
        if not self.ahead:
            self.issue(layer, self.plan(layer, q=q))
        kb, vb, n, ok = self.store.take(self.handles.pop(layer))
        kb[n:n + T], vb[n:n + T] = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)    # (T, B, Hkv, d)
        kd, vd = kb[:n + T].permute(1, 2, 0, 3), vb[:n + T].permute(1, 2, 0, 3)     # (B, Hkv, n+T, d)
        if ok is None:                                      # dense: rows are slots 0..t0+T
            mask, slots = self.mask, None
            self.fetched[layer] += 1.0 if T == 1 else 0.0
        else:                                               # by index: a mask per KV head
            ok = ok.to(self.dev, non_blocking=True)                                    # pinned on CUDA
            new = self.mask[:, :, :, t0:].expand(-1, ok.shape[1], -1, -1)              # (B, Hkv, T, T)
            mask = torch.cat([ok[:, :, None].expand(-1, -1, T, -1), new], -1)          # (B, Hkv, T, n+T)
            new_slots = (t0 + torch.arange(T, device=self.dev)).expand(self.B, ok.shape[1], T)
            slots = torch.cat([self.idx.pop(layer), new_slots], -1)                   # (B, Hkv, n+T)
            if T == 1:
                self.fetched[layer] += (ok.sum((1, 2)) / (ok.shape[1] * self.length.clamp(min=1))).mean()
        out = M.attention(q, kd, vd, mask)                  # queued before the host gathers for i+1
        if T > 1 and layer >= self.pol.dense_layers and self.pol.layer_budget == "prompt":   # at prefill
            last = mask[..., -64:, :]
            self.need[layer] = float(SK.needed_share(M.attention_probs(q[:, :, -64:], kd, last), last))
        if ahead:
            self.issue(layer + 1, nxt)                      # its copy overlaps this layer's attention and MLP
        self.observe(layer, q, kd, mask, slots)
        if self.pol.measure_recall and T == 1 and self.sparse(layer):
            self.recall[layer] += self.recall_of(layer, q, k, slots, mask)
        valid = self.valid[:, t0:t0 + T].cpu() if self.store.pool else None
        self.store.append(layer, t0, k, v, valid)
        return out

    def end(self):
        if self.T == 1:
            self.decode_steps += 1
        elif self.pol.layer_budget == "prompt" and self.need.any():    # a prefill chunk measured the need
            self.share = SK.layer_shares(self.need, self.pol.dense_layers).numpy()
        self.store.step_done()
        super().end()

    # --- Observe and recall
    def observe(self, layer, q, kd, mask, slots):  # what a policy learns from a layer's attention
        pass

    def recall_of(self, layer, q, k, slots, mask):
        """Attention mass (true, full attention) on the tokens the layer attended to."""
        kall = torch.cat([self.store.keys(layer, self.t0, self.dev).to(q.dtype), k], 2)   # (B, Hkv, t0+1, d)
        p = M.attention_probs(q, kall, self.valid[:, None, None, :self.t0 + 1])     # (B, H, 1, t0+1)
        chosen = torch.zeros_like(p, dtype=torch.bool)
        chosen.scatter_(-1, slots.repeat_interleave(self.G, 1)[:, :, None], mask.repeat_interleave(self.G, 1))
        return ((p * chosen).sum(-1).mean()).item()


# --- InfiniGen cache
class InfiniGen(OffloadCache):
    name = "infinigen"

    def __init__(self, model, pol, batch, slots, device, dtype, partial=None):
        super().__init__(model, pol, batch, slots, device, dtype)
        cfg = self.cfg
        self.P = list(partial or [None] * cfg.n_layers)    # per layer (Hkv, d, m), from calibration
        self.Wp = [None] * cfg.n_layers                 # per layer (H*m, C) and bias: partial query weight
        # Columns alone can be projected and rotated when no rotation mixes them with others.
        self.plane_closed = pol.skew == "planes" or (pol.skew == "none" and cfg.arch == "opt")
        self.kpart = [None if i < self.first else torch.zeros(batch, cfg.n_kv_heads, slots, self.m,
                                                              device=device, dtype=dtype)
                      for i in range(cfg.n_layers)]        # per sparse layer (B, Hkv, S, m): partial keys

    def device_bytes(self, batch, slots, elt):
        cfg, pol = self.cfg, self.pol
        self.m = SK.n_columns(pol.partial_ratio, cfg.head_dim, pol.skew == "planes")
        return (cfg.n_layers - self.first) * batch * cfg.n_kv_heads * slots * self.m * elt

    def observe(self, layer, q, kd, mask, slots):
        if self.P[layer] is None and layer >= self.pol.dense_layers:   # calibrate on the prompt itself
            keep = self.valid[:, self.t0:self.t0 + self.T]
            qc = q.transpose(1, 2)[keep]                                         # (N, H, d)
            kc = kd[:, :, -self.T:].transpose(1, 2)[keep]                        # (N, Hkv, d)
            P = SK.make_skew(qc, kc, self.pol.skew, self.pol.partial_ratio)[0]
            self.P[layer] = P.to(self.dev, q.dtype)
        if self.Wp[layer] is None and self.P[layer] is not None and self.plane_closed:
            wq = self.model.layers[layer].attn.wq
            self.Wp[layer] = SK.partial_query_weight(wq.weight, wq.bias, self.P[layer])
        if self.P[layer] is not None:                                   # the partial key cache grows
            new = kd[:, :, -self.T:] @ self.P[layer][None]                           # (B, Hkv, T, m)
            self.kpart[layer][:, :, self.t0:self.t0 + self.T] = new

    # --- InfiniGen select
    def select(self, layer, q, x, rope):
        qp = partial_query(x, self.model.layers[layer].attn, rope, self.P[layer], self.Wp[layer])
        s = speculate(qp, self.kpart[layer][:, :, :self.t0], self.scale, self.allowed)
        return threshold_select(s, self.pol.alpha, self.counts[layer], self.allowed, self.kmax[layer])


# --- Baselines
class Oracle(OffloadCache):
    name, ahead = "oracle", False

    def select(self, layer, q, x, rope):
        kall = self.store.keys(layer, self.t0, self.dev).to(q.dtype)                     # (B, Hkv, t0, d)
        s = speculate(q.view(self.B, -1, self.G, q.shape[-1]), kall, self.scale, self.allowed)  # (B, Hkv, t0)
        return topk_mask(s, self.counts[layer], self.allowed, self.kmax[layer])


class Streaming(OffloadCache):
    name, ahead = "streaming", False

    def begin(self, T, valid_new=None):  # the sinks stay even past a small budget: they bound a selection
        pos = super().begin(T, valid_new)
        self.kmax = [max(k, self.pol.sinks) for k in self.kmax]
        return pos

    def select(self, layer, q, x, rope):
        rank = self.allowed.long().cumsum(-1)                                     # 1.. for real tokens
        k = self.counts[layer]
        recent = rank > (self.length - (k - self.pol.sinks).clamp(min=0))[:, None, None]
        sel = (rank <= self.pol.sinks) | recent
        return sel.expand(-1, self.cfg.n_kv_heads, -1)


class H2O(OffloadCache):
    name, ahead = "h2o", False

    def __init__(self, model, pol, batch, slots, device, dtype):
        super().__init__(model, pol, batch, slots, device, dtype)
        shape = (self.cfg.n_layers, batch, self.cfg.n_kv_heads, slots)          # (L, B, Hkv, S)
        self.score = torch.zeros(shape, device=device)
        self.alive = torch.ones(shape, device=device, dtype=torch.bool)

    def device_bytes(self, batch, slots, elt):
        return self.cfg.n_layers * batch * self.cfg.n_kv_heads * slots * 5        # float32 scores, bool alive

    def observe(self, layer, q, kd, mask, slots):
        p = M.attention_probs(q, kd, mask)                                        # (B, H, T, n)
        p = p.view(self.B, -1, self.G, *p.shape[2:]).sum((2, 3))                  # (B, Hkv, n)
        if slots is None:
            self.score[layer, :, :, :p.shape[-1]] += p
        else:
            self.score[layer].scatter_add_(-1, slots, p * (slots < self.S))

    def select(self, layer, q, x, rope):
        k = self.counts[layer]
        n_recent = (k.double() * self.pol.recent).long()
        rank = self.allowed.long().cumsum(-1)
        recent = rank > (self.length - n_recent)[:, None, None]
        alive = self.alive[layer, :, :, :self.t0] & self.allowed
        heavy = topk_mask(self.score[layer, :, :, :self.t0], k - n_recent, alive & ~recent, self.kmax[layer])
        sel = heavy | (recent & self.allowed)
        self.alive[layer, :, :, :self.t0] &= sel                                   # evicted for good
        return sel


# --- Making a cache
CACHES = {"offload": OffloadCache, "infinigen": InfiniGen, "h2o": H2O, "streaming": Streaming,
          "oracle": Oracle}


def make_cache(model, pol: Policy, batch, slots, partial=None):
    """The policy's cache for `batch` sequences of up to `slots` tokens (partial: offline skew)."""
    p = next(model.parameters())
    if pol.name == "full":
        c = model.cfg
        preflight(0, 2 * c.n_layers * batch * c.n_kv_heads * slots * c.head_dim * p.element_size(), p.device)
        return M.DenseCache(c, batch, slots, p.device, p.dtype)
    extra = (partial,) if pol.name == "infinigen" else ()
    return CACHES[pol.name](model, pol, batch, slots, p.device, p.dtype, *extra)


def calibrate(model, tokens, pol: Policy):
    """Offline skew: the partial maps P per layer from a calibration text (1, T) instead of the prompt."""
    pol = Policy("infinigen", skew=pol.skew, partial_ratio=pol.partial_ratio, gather=pol.gather)
    cache = make_cache(model, pol, 1, tokens.shape[1])
    prefill(model, cache, tokens.to(cache.dev), torch.ones_like(tokens, dtype=torch.bool))
    return cache.P


# --- Sampling
def sample(logits, temperature, top_p, gen):
    """logits (B, V) -> next tokens (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    sp, si = probs.sort(-1, descending=True)
    sp[(sp.cumsum(-1) - sp) > top_p] = 0                           # keep the smallest set above top_p
    choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen)
    return si.gather(-1, choice).squeeze(-1)


# --- Decode loop
@torch.no_grad()
def prefill(model, cache, tokens, valid, chunk=1024, progress=False):
    """Run the prompt (B, T) through the model in chunks; return the last position's logits (B, V)."""
    T = tokens.shape[1]
    for s in range(0, T, chunk):
        logits = model(tokens[:, s:s + chunk], cache, valid[:, s:s + chunk], last=True)
        if progress and T > chunk:
            print(f"\r  prefill {min(s + chunk, T)}/{T} tokens", end="", file=sys.stderr, flush=True)
    if progress and T > chunk:
        print(file=sys.stderr)
    return logits[:, -1]


@torch.no_grad()
def decode_one(model, cache, tok):
    """One new token per sequence (B,) -> logits (B, V)."""
    return model(tok[:, None], cache)[:, 0]


# --- Generate
@torch.no_grad()
def generate(model, prompts, pol=None, max_new=64, temperature=0.0, top_p=1.0, seed=0, stop_ids=(),
             on_token=None, partial=None, progress=False, time_copies=False):
    """Greedy or sampled generation for a batch of token lists (left-padded). Returns (outputs, stats).
    time_copies: on CUDA, time the compute stream's waits for copies with events (a sync per step)."""
    pol = pol or Policy()
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda d: None)
    B, T = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("an empty prompt: give at least one token (or drop --no-chat)")
    if T + max_new > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens + {max_new} new tokens exceeds the model's context "
                         f"of {model.cfg.max_seq_len}")
    tokens = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):], valid[b, T - len(p):] = torch.tensor(p), True
    cache = make_cache(model, pol, B, T + max_new, partial)
    if hasattr(cache, "store"):
        cache.store.timing = time_copies and cache.store.cuda
    gen = torch.Generator(device=dev).manual_seed(seed)
    sync(dev); t = time.perf_counter()
    logits = prefill(model, cache, tokens.to(dev), valid, progress=progress)   # valid stays on the host
    sync(dev); t_prefill = time.perf_counter() - t
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
    t = time.perf_counter()
    for i in range(max_new):
        nxt = sample(logits, temperature, top_p, gen)
        out.append(nxt)
        done |= torch.isin(nxt, stop)
        if on_token:
            on_token(nxt)
        if bool(done.all()) or i == max_new - 1:
            break
        logits = decode_one(model, cache, nxt)
    sync(dev); t_decode = time.perf_counter() - t
    ids = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    ids = [r[:next((j for j, x in enumerate(r) if x in stop_ids), len(r))] for r in ids]
    return ids, stats_of(model, cache, t_prefill, t_decode, len(out) - 1, B)


if __name__ == "__main__":   # the command line lives in cli.py: `python infinigen.py --help`
    import cli
    cli.main()
