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
import os
import signal
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__":  # a Ctrl-C while torch imports: no traceback, status 130 (cli.main takes over)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
import torch

import model as M
import skew as SK
from model import Tok  # noqa: F401  (re-exported for scripts: I.Tok)
from offload import GATHERS, GraphError, KVStore, Pool, kv_rows, preflight, stats_of
from skew import speculate, threshold_slots, to_index, top_slots, topk_mask

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
    graphs: bool = True          # CUDA: decode steps replayed as one CUDA graph, where the step allows it
    head_count: str = "own"      # infinigen: each KV head its count within alpha | mean: the heads' mean

    def __post_init__(self):  # every impossible setting, refused with one line
        for ok, why in [
            (self.name in POLICIES, f"unknown policy {self.name!r} (choose from {', '.join(POLICIES)})"),
            (self.budget > 0 and math.isfinite(self.budget) and (self.budget <= 1 or self.budget % 1 == 0),
             f"impossible budget {self.budget}: give a fraction in (0, 1] or a whole token count > 1"),
            (0 < self.partial_ratio <= 1, f"partial ratio {self.partial_ratio} must be in (0, 1]"),
            (self.alpha >= 0, f"alpha {self.alpha} must be >= 0 (inf: no threshold, the budget decides)"),
            (0 <= self.recent <= 1, f"recent share {self.recent} must be in [0, 1]"),
            (0 <= self.capacity < math.inf and (self.capacity <= 1 or self.capacity % 1 == 0),
             f"CPU KV capacity {self.capacity} must be a fraction <= 1, a whole count of tokens, or 0 (all)"),
            (self.dense_layers >= (self.name == "infinigen"), "--dense-layers must be >= 0, and >= 1 for "
             "infinigen: it speculates layer i+1 from layer i, so layer 0 is dense"),
            (not self.capacity or self.name not in ("full", "oracle") and not self.measure_recall,
             "no CPU pool (--cpu-kv-capacity) for full (no CPU store), oracle, --measure-recall (all keys)"),
            (self.name != "full" or not self.measure_recall, "--measure-recall compares a sparse policy's "
             "tokens with full attention: not for --policy full"),
            (self.layer_budget in ("uniform", "prompt"),
             f"unknown layer budget {self.layer_budget!r} (uniform or prompt)"),
            (self.head_count in ("own", "mean"), f"unknown head count {self.head_count!r} (own or mean)"),
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
        (B,) or (L, B), a tensor on n's device (a decode step counts on the device, with float32 products;
        the host counts its bounds with the same arithmetic)."""
        n = torch.as_tensor(n)
        share = torch.as_tensor(share, dtype=torch.float64, device=n.device)
        if self.budget <= 1:   # budget 1: everything, always
            f = torch.ones_like(share) if self.budget == 1 else (self.budget * share).clamp(max=1.0)
            k = torch.ceil(n.float() * f.float())
        else:                                         # a count; 1e20 tokens is all of them, not an overflow
            k = torch.trunc(min(self.budget, 2**31) * share)
            k = k + torch.zeros(n.shape, dtype=torch.float64, device=n.device)
        return k.long().clamp(min=1).minimum(n)


# The authors' choices (speedup/scripts/*/run.sh and kv_selection_controller.py of snu-comparch/InfiniGen):
# SVD skew (offline there, here on the prompt unless --calib), r 0.2, alpha 4, budget 0.2 for every sparse
# layer, and every head fetching the heads' mean count within alpha.
PAPER = dict(skew="svd", partial_ratio=0.2, alpha=4.0, budget=0.2, layer_budget="uniform", head_count="mean")


# --- Offloaded caches
class OffloadCache(M.Cache):
    """K, V of layers `first`.. in the CPU store, each attending over what its fetch brought plus the
    new tokens; the layers before `first` (the sparse policies' dense layers) stay whole on the device.
    Alone it is the `offload` policy; subclasses choose `select(layer, q, x, rope)` (a mask, or slots, of at
    most `kmax[layer]` tokens per KV head) and `ahead`: whether that runs one layer early or at the layer."""
    name, ahead, by_slot = "offload", True, False     # by_slot: observe reads the attended rows' slots

    def __init__(self, model, pol: Policy, batch, slots, device, dtype):
        super().__init__(batch, slots, device)
        cfg = self.cfg = model.cfg
        self.model, self.pol, self.dev = model, pol, device
        self.G, self.scale = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim ** -0.5
        self.first = 0 if self.name == "offload" else min(pol.dense_layers, cfg.n_layers)
        res = (self.first, batch, cfg.n_kv_heads, slots, cfg.head_dim)          # (first, B, Hkv, S, d)
        elt = torch.tensor([], dtype=dtype).element_size()
        extra = 2 * math.prod(res) * elt + self.device_bytes(batch, slots, elt)
        cap = int(pol.capacity if pol.capacity > 1 else max(round(pol.capacity * slots), pol.capacity > 0))
        pool = Pool(cfg.n_layers - self.first, batch, slots, cap, pol.eviction) if 0 < cap < slots else None
        self.store = KVStore(cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim, device, dtype, pool,
                             pol.gather, self.first, extra)
        self.rk, self.rv = (torch.zeros(res, device=device, dtype=dtype) for _ in "kv")  # resident K, V
        self.fetched = torch.zeros(cfg.n_layers, device=device)          # sum over steps of fraction fetched
        self.kept = torch.zeros(cfg.n_layers, batch, device=device)      # (L, B) rows fetched this step
        self.recall, self.need = torch.zeros(cfg.n_layers, dtype=torch.float64), torch.zeros(cfg.n_layers)
        self.decode_steps, self.handles, self.idx = 0, {}, {}                 # recall, need: (L,) on the host
        self.set_shares(torch.ones(cfg.n_layers))

    def device_bytes(self, batch, slots, elt):  # what a policy keeps on the device besides K, V
        return 0

    def sparse(self, layer):
        return self.T == 1 and layer >= self.pol.dense_layers and self.name != "offload"

    def set_shares(self, share):
        """Each layer's share of the budget (L,): on the device for a step's counts; on the host `kmax`, each
        layer's bound of a selection: the count of the longest past (S - 1 tokens), so shapes never change."""
        self.share, self.share_dev = share, share.double().to(self.dev)[:, None]      # (L,), (L, 1)
        self.kmax = self.pol.count(torch.tensor([max(self.S - 1, 1)]), share[:, None])[:, 0].tolist()

    def enter(self, T, valid_new=None):
        super().enter(T, valid_new)
        self.store.ledger.decoding = self.decoding = T == 1 and self.t0 > 0   # a one-token prompt: no step

    def begin(self, T, valid_new=None):
        pos = super().begin(T, valid_new)
        w = self.S if T == 1 else self.t0                                # a decode step reads every slot
        self.allowed = (self.valid[:, :w] & (self.slot[:w] < self.next))[:, None]    # (B, 1, w) the past
        self.counts = self.pol.count(self.length, self.share_dev)                     # (L, B) tokens to keep
        self.new_mask = self.mask.index_select(-1, self.at)                   # (B, 1, T, T) among new tokens
        if self.ahead and self.first == 0:
            self.issue(0, self.plan(0))
        return pos

    # --- Plan and issue
    def plan(self, layer, q=None, x=None, rope=None):
        """What `layer` needs of the past: None (all, one block) or (idx, ok, event) per KV head; for
        the host gather they are already on their way to host memory, and the event says when."""
        if self.t0 == 0 or (not self.sparse(layer) and self.store.pool is None):
            return None
        if self.sparse(layer):                   # select gives slots (idx, ok), or a mask (B, Hkv, w)
            sel = self.select(layer, q, x, rope)
            idx, ok = sel if isinstance(sel, tuple) else to_index(sel & self.allowed, self.kmax[layer])
        else:  # dense, but a bounded pool scatters tokens: fetch every past token by index
            idx, ok = to_index(self.allowed.expand(-1, self.cfg.n_kv_heads, -1), max(self.t0, 1))
        self.idx[layer] = idx                   # kept: freed by the next plan, after the copy stream waits
        if self.store.gather == "host":                                          # pinned, async on CUDA
            idx, ok = idx.to("cpu", non_blocking=True), ok.to("cpu", non_blocking=True)
        return idx, ok, torch.cuda.current_stream(self.dev).record_event() if self.store.cuda else None

    def issue(self, layer, plan):
        """Start copying what `plan` chose for `layer`."""
        idx, ok, ev = plan or (None, None, None)                         # None: the whole past
        if ev is not None and self.store.gather == "host":
            ev.synchronize()                                # the indices only, not the queued attention
        self.handles[layer] = self.store.fetch(layer, self.t0, idx, ok, after=ev)

    # --- Attend
    def attend(self, layer, q, k, v, x, rope):
        ahead = self.ahead and self.first <= layer + 1 < self.cfg.n_layers
        nxt = self.plan(layer + 1, x=x, rope=rope) if ahead else None   # speculate layer i+1 first
        T, span = self.T, self.span
        if layer < self.first:                              # resident, as in the full policy
            self.rk[layer].index_copy_(2, self.at, k), self.rv[layer].index_copy_(2, self.at, v)
            out = M.attention(q, self.rk[layer, :, :, :span], self.rv[layer, :, :, :span], self.mask)
            if ahead:
                self.issue(layer + 1, nxt)
            return out
        if not self.ahead:
            self.issue(layer, self.plan(layer, q=q))
        kv, n, ok = self.store.take(self.handles.pop(layer))                # (S, B, Hkv, 2, d) on the device
        added = kv_rows(k, v, out=kv[n:n + T])                  # the new tokens, after the n fetched rows
        rows = span if ok is None and self.decoding else n + T   # decode's dense read: all S (fixed shapes)
        kd, vd = kv[:rows].permute(1, 2, 0, 3, 4).unbind(3)                         # (B, Hkv, rows, d)
        if ok is None:                  # every past row fetched (slots not yet written are masked)
            mask, slots, got = self.mask[..., :rows], None, self.allowed.expand(-1, self.cfg.n_kv_heads, -1)
        else:                                               # by index: a mask per KV head
            got = ok = ok.to(self.dev, non_blocking=True)                              # pinned on CUDA
            new = self.new_mask.expand(-1, ok.shape[1], -1, -1)                         # (B, Hkv, T, T)
            mask = torch.cat([ok[:, :, None].expand(-1, -1, T, -1), new], -1)          # (B, Hkv, T, n+T)
            slots = (torch.cat([self.idx[layer], self.at.expand(*ok.shape[:2], T)], -1)   # (B, Hkv, n+T):
                     if self.by_slot or self.pol.measure_recall else None)      # for observe, recall
        torch.sum(got, (1, 2), dtype=self.kept.dtype, out=self.kept[layer])   # (B,) past rows fetched
        out = M.attention(q, kd, vd, mask)                  # queued before the host gathers for i+1
        if T > 1 and layer >= self.pol.dense_layers and self.pol.layer_budget == "prompt":   # at prefill
            qn, last = q[:, :, -SK.NEED_QUERIES:], mask[..., -SK.NEED_QUERIES:, :]    # its last queries
            self.need[layer] = float(SK.needed_share(M.attention_probs(qn, kd, last), last))
        if ahead:
            self.issue(layer + 1, nxt)                      # its copy overlaps this layer's attention and MLP
        self.observe(layer, q, kd, mask, slots)
        if self.pol.measure_recall and self.decoding and self.sparse(layer):
            self.recall[layer] += self.recall_of(layer, q, k, slots, mask)
        valid = self.valid[:, self.t0:self.t0 + T].cpu() if self.store.pool else None
        self.store.append(layer, self.t0, added, valid, self.at)
        return out

    def end(self):  # a decode step's rows fetched (kept) as shares of each sequence's past, summed per layer
        per_row = self.decoding / (self.B * self.cfg.n_kv_heads * self.length.clamp(min=1))  # (B,), pre-step
        self.fetched.addmv_(self.kept, per_row)
        super().end()

    def leave(self):
        self.decode_steps += self.decoding
        if not self.decoding and self.pol.layer_budget == "prompt" and self.need.any():  # prefill measured it
            self.set_shares(SK.layer_shares(self.need, self.pol.dense_layers, budget=self.pol.budget))
        self.store.step_done()
        super().leave()

    # --- Observe and recall
    def observe(self, layer, q, kd, mask, slots):  # what a policy learns from a layer's attention
        pass

    def recall_of(self, layer, q, k, slots, mask):
        """Attention mass (true, full attention) on the tokens the layer attended to."""
        kall = torch.cat([self.store.keys(layer, self.t0, self.dev).to(q.dtype), k], 2)   # (B, Hkv, t0+1, d)
        p = M.attention_probs(q, kall, self.valid[:, None, None, :self.t0 + 1])     # (B, H, 1, t0+1)
        slots = torch.where(mask[:, :, 0], slots, self.t0)      # rows not fetched: the new token's slot
        chosen = torch.zeros_like(p, dtype=torch.bool)
        chosen.scatter_(-1, slots.repeat_interleave(self.G, 1)[:, :, None], True)
        return ((p * chosen).sum(-1).mean()).item()


# --- InfiniGen cache
class InfiniGen(OffloadCache):
    name = "infinigen"

    def __init__(self, model, pol, batch, slots, device, dtype, partial=None):
        super().__init__(model, pol, batch, slots, device, dtype)
        cfg = self.cfg
        self.P = list(partial or [None] * cfg.n_layers)    # per layer (Hkv, d, m), from calibration
        self.Wp = [None] * cfg.n_layers                 # per layer: partial query weight, bias, columns
        # Columns alone can be projected and rotated when no rotation mixes them with others.
        self.plane_closed = pol.skew == "planes" or (pol.skew == "none" and cfg.arch == "opt")
        self.kpart = [None if i < self.first else torch.zeros(batch, cfg.n_kv_heads, slots, self.m,
                                                              device=device, dtype=dtype)
                      for i in range(cfg.n_layers)]        # per sparse layer (B, Hkv, S, m): partial keys

    def device_bytes(self, batch, slots, elt):
        self.m = SK.n_columns(self.pol.partial_ratio, self.cfg.head_dim, self.pol.skew == "planes")
        return (self.cfg.n_layers - self.first) * batch * self.cfg.n_kv_heads * slots * self.m * elt

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
            new = SK.partial_keys(kd[:, :, -self.T:], self.P[layer], self.Wp[layer])    # (B, Hkv, T, m)
            self.kpart[layer].index_copy_(2, self.at, new)

    # --- InfiniGen select
    def select(self, layer, q, x, rope):
        s = SK.speculate_ahead(x, self.model.layers[layer].attn, rope, self.P[layer], self.Wp[layer],
                               self.kpart[layer][:, :, :self.allowed.shape[-1]], self.scale, self.allowed)
        mean = self.pol.head_count == "mean"                         # the authors' rule (chapter 10)
        return threshold_slots(s, self.pol.alpha, self.counts[layer], self.kmax[layer], mean)   # (idx, ok)


# --- Baselines
class Oracle(OffloadCache):
    name, ahead = "oracle", False

    def select(self, layer, q, x, rope):
        kall = self.store.keys(layer, self.allowed.shape[-1], self.dev).to(q.dtype)       # (B, Hkv, w, d)
        s = speculate(q.view(self.B, -1, self.G, q.shape[-1]), kall, self.scale, self.allowed)  # (B, Hkv, w)
        return top_slots(s, self.counts[layer], self.kmax[layer])                      # (idx, ok)


class Streaming(OffloadCache):
    name, ahead = "streaming", False

    def set_shares(self, share):  # the sinks stay even past a small budget: they bound a selection
        super().set_shares(share)
        self.kmax = [min(max(k, self.pol.sinks), max(self.S - 1, 1)) for k in self.kmax]

    def select(self, layer, q, x, rope):
        rank = self.allowed.long().cumsum(-1)                                     # 1.. for real tokens
        recent = rank > (self.length - (self.counts[layer] - self.pol.sinks).clamp(min=0))[:, None, None]
        return (((rank <= self.pol.sinks) | recent) & self.allowed).expand(-1, self.cfg.n_kv_heads, -1)


class H2O(OffloadCache):
    name, ahead, by_slot = "h2o", False, True

    def __init__(self, model, pol, batch, slots, device, dtype):
        super().__init__(model, pol, batch, slots, device, dtype)
        shape = (self.cfg.n_layers, batch, self.cfg.n_kv_heads, slots)          # (L, B, Hkv, S)
        self.score, self.alive = torch.zeros(shape, device=device), torch.full(shape, True, device=device)

    def device_bytes(self, batch, slots, elt):
        return self.cfg.n_layers * batch * self.cfg.n_kv_heads * slots * 5        # float32 scores, bool alive

    def observe(self, layer, q, kd, mask, slots):
        p = M.attention_probs(q, kd, mask).unflatten(1, (-1, self.G)).sum((2, 3))       # (B, Hkv, n)
        slots = self.slot[:p.shape[-1]].expand_as(p) if slots is None else slots     # (B, Hkv, n) their slots
        self.score[layer].scatter_add_(-1, slots, p * (slots < self.S))

    def select(self, layer, q, x, rope):
        k, n_recent = self.counts[layer], (self.counts[layer].double() * self.pol.recent).long()
        rank, w = self.allowed.long().cumsum(-1), self.allowed.shape[-1]
        recent = rank > (self.length - n_recent)[:, None, None]
        alive = self.alive[layer, :, :, :w] & self.allowed
        heavy = topk_mask(self.score[layer, :, :, :w], k - n_recent, alive & ~recent, self.kmax[layer])
        sel = heavy | (recent & self.allowed)
        self.alive[layer, :, :, :w] &= sel | ~self.allowed                   # past tokens evicted for good
        return sel


# --- Making a cache
CACHES = dict(offload=OffloadCache, infinigen=InfiniGen, h2o=H2O, streaming=Streaming, oracle=Oracle)


def make_cache(model, pol: Policy, batch, slots, partial=None):
    """The policy's cache for `batch` sequences of up to `slots` tokens (partial: offline skew)."""
    p = next(model.parameters())
    if pol.name == "full":
        c = model.cfg
        preflight(0, 2 * c.n_layers * batch * c.n_kv_heads * slots * c.head_dim * p.element_size(), p.device)
        return M.DenseCache(c, batch, slots, p.device, p.dtype)
    extra = (partial,) if pol.name == "infinigen" else ()
    return CACHES[pol.name](model, pol, batch, slots, p.device, p.dtype, *extra)


def calibrate(model, tokens, p: Policy):
    """Offline skew: the partial maps P per layer from a calibration text (1, T) instead of the prompt."""
    pol = Policy("infinigen", **{k: getattr(p, k) for k in "skew partial_ratio gather dense_layers".split()})
    cache = make_cache(model, pol, 1, tokens.shape[1])
    prefill(model, cache, tokens.to(cache.dev), torch.ones_like(tokens, dtype=torch.bool))
    return cache.P


# --- Sampling
def sample(logits, temperature, top_p, gen):
    """logits (B, V) -> next tokens (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).nan_to_num().softmax(-1)   # NaN: a device assert on CUDA
    sp, si = probs.sort(-1, descending=True)
    sp[(sp.cumsum(-1) - sp) > top_p] = 0                           # keep the smallest set above top_p
    choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen)
    return si.gather(-1, choice).squeeze(-1)


# --- Decode loop
@torch.no_grad()
def prefill(model, cache, tokens, valid, chunk=1024, progress=False):
    """The prompt (B, T) through the model in chunks, the last of min(64, chunk) tokens or more (the layer
    rule reads its last SK.NEED_QUERIES; one token would be a decode step); -> the last logits (B, V)."""
    T, chunk = tokens.shape[1], max(chunk, 2)
    ends = [*range(chunk, T - min(chunk, SK.NEED_QUERIES) + 1, chunk), T]
    for s, e in zip([0, *ends], ends):
        logits = model(tokens[:, s:e], cache, valid[:, s:e], last=True)
        if progress and T > chunk:
            print(f"\r  prefill {e}/{T} tokens", end="" if e < T else "\n", file=sys.stderr, flush=True)
    return logits[:, -1]


@torch.no_grad()
def decode_one(model, cache, tok):
    """One new token per sequence (B,) -> logits (B, V)."""
    return model(tok[:, None], cache)[:, 0]


# --- CUDA graphs
def replayable(cache):
    """Whether a decode step of this cache does the same at every step, all of it on the device: the same
    operations, shapes and addresses (tests/test_graphs.py checks it on the CPU). Not: the host gather and
    the bounded pool (they decide on the host), a fetch of the whole past (it grows: `offload`), recall
    (it reads the past of a length), timing and tracing (they read events on the host)."""
    st = getattr(cache, "store", None)                                        # None: full
    return st is None or (st.gather == "device" and st.pool is None and cache.name != "offload"
                          and not cache.pol.measure_recall and not st.timing and st.trace is None)


def graphable(cache, pol):  # replay decode steps as a CUDA graph: on CUDA, unless pol says not to
    return cache.valid.is_cuda and pol.graphs and replayable(cache)      # (full's cache has no pol)


class Graphed:
    """Decode steps as a CUDA graph: the first call is a plain step (Triton compiles, the allocator warms),
    the second records the step's kernels, copies and events into one graph and replays it; later calls replay
    it, with no Python and no launches of their own. A decode step reads every slot and writes through slot
    numbers on the device (model.Cache), so one graph fits every step. The host's part of a step is not in the
    graph: each replay runs Cache.enter and leave around it and adds to the ledger what recording counted."""
    def __init__(self, model, cache):
        self.model, self.cache, self.graph, self.warm = model, cache, None, False
        self.ledger = cache.store.ledger if hasattr(cache, "store") else None

    def __call__(self, tok):
        if not self.warm:
            self.warm = True
            return decode_one(self.model, self.cache, tok)
        if self.graph is None:
            return self.record(tok)
        self.tok.copy_(tok)
        self.cache.enter(1)
        self.graph.replay()
        self.cache.leave()
        if self.ledger:
            self.ledger.add_host_counts(self.delta)
            self.cache.store.forget_events(replayed=True)
        return self.logits

    def record(self, tok):
        if self.ledger:
            self.cache.store.forget_events()
            before = self.ledger.host_counts()
        self.tok, self.graph = tok.clone(), torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):      # recording runs the host's part of one step ...
                self.logits = decode_one(self.model, self.cache, self.tok)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:                   # a step that cannot be recorded: a bug (report it)
            raise GraphError(f"recording a decode step as a CUDA graph failed ({e}): try --no-graphs") from e
        self.graph.replay()                         # ... and this replay its device part
        if self.ledger:
            self.delta = [a - b for a, b in zip(self.ledger.host_counts(), before)]
            self.cache.store.forget_events(replayed=True)
        return self.logits


# --- Generate
@torch.no_grad()
def generate(model, prompts, pol=None, max_new=64, temperature=0.0, top_p=1.0, seed=0, stop_ids=(),
             on_token=None, partial=None, progress=False, time_copies=False):
    """Greedy or sampled generation for a batch of token lists (left-padded). Returns (outputs, stats).
    time_copies: on CUDA, time the compute stream's waits for copies with events (a sync per step), unless
    the decode steps are a CUDA graph."""
    pol = pol or Policy()
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda d: None)
    B, T = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("an empty prompt: give at least one token (or drop --no-chat)")
    if T + max_new > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens + {max_new} new token{'s' * (max_new != 1)} exceeds the "
                         f"model's context of {model.cfg.max_seq_len}")
    tokens, valid = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):], valid[b, T - len(p):] = torch.tensor(p), True
    cache = make_cache(model, pol, B, T + max_new, partial)
    step = Graphed(model, cache) if graphable(cache, pol) else (lambda tok: decode_one(model, cache, tok))
    if hasattr(cache, "store"):
        cache.store.timing = time_copies and cache.store.cuda and not isinstance(step, Graphed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    sync(dev); t = time.perf_counter()
    logits = prefill(model, cache, tokens.to(dev), valid, progress=progress)   # valid stays on the host
    sync(dev); t_prefill = time.perf_counter() - t
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
    t = time.perf_counter()
    for i in range(max_new):
        nxt = sample(logits, temperature, top_p, gen)
        done |= torch.isin(nxt, stop)
        finished, finite = torch.stack([done.all(), logits.isfinite().all()]).tolist()    # one sync a step
        if not finite:                                              # greedy would pick token 0 and go on
            raise ValueError("the logits are not finite (NaN, inf): broken weights, or --dtype overflows")
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if finished or i == max_new - 1:
            break
        logits = step(nxt)
    sync(dev); t_decode = time.perf_counter() - t
    ids = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    ids = [r[:next((j for j, x in enumerate(r) if x in stop_ids), len(r))] for r in ids]
    return ids, {**stats_of(model, cache, t_prefill, t_decode, max(len(out) - 1, 0), B),
                 "cuda_graph": isinstance(step, Graphed)}


if __name__ == "__main__":   # the command line lives in cli.py: `python infinigen.py --help`
    import cli
    cli.run_script(lambda: cli.main(script=True))
