"""InfiniGen: the policies, the decode loop and the command line. Every policy is a cache object
handed to the one model in model.py:
  full      K, V of every layer stay on the device (model.DenseCache).
  offload   K, V in CPU memory; every layer's whole past copied each step, layer i+1's while i computes.
  infinigen layers 0..dense-1 dense; while layer i runs, layer i+1's scores are speculated from layer
            i's attention input, partial query weight and partial key cache; the tokens within alpha
            of the best (capped by the budget) are prefetched.
  h2o       heavy hitters by accumulated attention plus a recent window; evicted for good.
  streaming attention sinks plus a recent window.   oracle  the true top-k (evaluation only).
Shapes: B batch, T new tokens, S slots, H heads, Hkv KV heads, G = H // Hkv, d head dim, n fetched.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

import model as M
import skew as SK
from model import Tok
from offload import KVStore, OffloadError, Pool, stats_of
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
    dense_layers: int = 2        # layers that always fetch everything (sparse policies)
    recent: float = 0.5          # h2o / streaming: share of the budget given to the recent window
    sinks: int = 4               # streaming: first tokens always kept
    capacity: float = 0          # CPU pool: tokens per sequence (> 1) or fraction of the context; 0 = all
    eviction: str = "counter"    # fifo | lru | counter
    layer_budget: str = "prompt"  # prompt: sparse layers share the budget by their need at prefill | uniform
    measure_recall: bool = False

    def __post_init__(self):  # every impossible setting, refused with one line
        for ok, why in [
            (self.name in POLICIES, f"unknown policy {self.name!r} (choose from {', '.join(POLICIES)})"),
            (self.budget > 0 and math.isfinite(self.budget),
             f"impossible budget {self.budget}: give a fraction in (0, 1] or a token count > 1"),
            (0 < self.partial_ratio <= 1, f"partial ratio {self.partial_ratio} must be in (0, 1]"),
            (self.alpha >= 0, f"alpha {self.alpha} must be >= 0 (inf: no threshold, the budget decides)"),
            (0 <= self.recent <= 1, f"recent share {self.recent} must be in [0, 1]"),
            (self.capacity >= 0, f"CPU KV capacity {self.capacity} must be >= 0 (0: unbounded)"),
            (self.dense_layers >= (self.name == "infinigen"), "--dense-layers must be >= 0, and >= 1 for "
             "infinigen: it speculates layer i+1 from layer i, so layer 0 is dense"),
            (not self.capacity or (self.name != "oracle" and not self.measure_recall),
             "oracle and --measure-recall read every key: they need an unbounded CPU store"),
            (self.layer_budget in ("uniform", "prompt"), f"unknown layer budget {self.layer_budget!r} (uniform or prompt)"),
            (self.skew in SK.MODES, f"unknown skew mode {self.skew!r} (choose from {', '.join(SK.MODES)})")]:
            if not ok:
                raise ValueError(why)

    def count(self, n, share=1.0):  # n (B,) past tokens, share: this layer's part -> tokens to keep (B,)
        f = 1.0 if self.budget == 1 else min(self.budget * share, 1.0)            # budget 1: everything, always
        k = torch.ceil(n * f) if self.budget <= 1 else torch.full_like(n, int(self.budget * share))
        return torch.minimum(k.long().clamp(min=1), n)


# --- Offloaded caches
class OffloadCache(M.Cache):
    """K, V in the CPU store; each layer attends over what its fetch brought plus the new tokens.
    Alone it is the `offload` policy; subclasses choose `select(layer, q, x, rope)` (at most `kmax`
    tokens per KV head), and `ahead` says whether that runs one layer early or at the layer itself."""
    name, ahead = "offload", True

    def __init__(self, model, pol: Policy, batch, slots, device, dtype):
        super().__init__(batch, slots, device)
        cfg = self.cfg = model.cfg
        self.model, self.pol, self.dev = model, pol, device
        self.G, self.scale = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim ** -0.5
        cap = pol.capacity if pol.capacity > 1 else round(pol.capacity * slots)
        pool = Pool(cfg.n_layers, batch, slots, int(cap), pol.eviction) if 0 < cap < slots else None
        self.store = KVStore(cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim, device, dtype, pool)
        self.fetched = torch.zeros(cfg.n_layers, device=device)          # sum over steps of fraction fetched
        self.recall = torch.zeros(cfg.n_layers, dtype=torch.float64)
        self.decode_steps, self.handles, self.idx = 0, {}, {}
        self.need, self.share = torch.zeros(cfg.n_layers), torch.ones(cfg.n_layers)     # (L,) on the host

    def sparse(self, layer):
        return self.T == 1 and layer >= self.pol.dense_layers and self.name != "offload"

    def begin(self, valid_new):
        pos = super().begin(valid_new)
        self.allowed = self.valid[:, None, :self.t0]                                # (B, 1, t0) past tokens
        self.kmax = int(self.pol.count(self.length.cpu(), float(self.share.max())).max())   # host: no sync per layer
        if self.ahead:
            self.issue(0, self.plan(0))
        return pos

    def count(self, layer):  # (B,) tokens a sparse layer keeps: the budget times the layer's share
        return self.pol.count(self.length, float(self.share[layer]))

    def plan(self, layer, q=None, x=None, rope=None):
        """What `layer` needs of the past: None (all, one block) or (idx, ok) per KV head, already on
        their way to host memory (a copy and an event on CUDA) so the host waits for nothing else."""
        if self.t0 == 0 or (not self.sparse(layer) and self.store.pool is None):
            return None
        if self.sparse(layer):
            sel = self.select(layer, q, x, rope) & self.allowed                 # (B, Hkv, t0)
        else:  # dense, but a bounded pool scatters tokens: fetch every past token by index
            sel = self.allowed.expand(-1, self.cfg.n_kv_heads, -1)
        idx, ok = to_index(sel, self.kmax if self.sparse(layer) else self.t0)   # n: a bound, no device sync
        self.idx[layer] = idx
        ev = torch.cuda.Event() if self.store.cuda else None
        host = (idx.to("cpu", non_blocking=True), ok.to("cpu", non_blocking=True))   # pinned, async on CUDA
        if ev:
            ev.record()
        return (*host, ev)

    def issue(self, layer, plan):
        """Start copying what `plan` chose for `layer`."""
        if plan is not None and plan[2] is not None:
            plan[2].synchronize()                           # only the selection, not the queued attention
        self.handles[layer] = self.store.fetch(layer, self.t0, *(plan[:2] if plan else ()))

    def attend(self, layer, q, k, v, x, rope):
        ahead = self.ahead and layer + 1 < self.cfg.n_layers
        nxt = self.plan(layer + 1, x=x, rope=rope) if ahead else None   # speculate layer i+1 first
        if not self.ahead:
            self.issue(layer, self.plan(layer, q=q))
        kb, vb, n, ok = self.store.take(self.handles.pop(layer))
        t0, T = self.t0, self.T
        kb[n:n + T], vb[n:n + T] = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)    # (T, B, Hkv, d)
        kd, vd = kb[:n + T].permute(1, 2, 0, 3), vb[:n + T].permute(1, 2, 0, 3)     # (B, Hkv, n+T, d)
        if ok is None:                                      # dense: rows are slots 0..t0+T
            mask, slots = self.mask, None
            self.fetched[layer] += 1.0 if T == 1 else 0.0
        else:                                               # by index: a mask per KV head
            ok = ok.to(self.dev, non_blocking=True)                                    # pinned on CUDA
            new = self.mask[:, :, :, t0:].expand(-1, ok.shape[1], -1, -1)              # (B, Hkv, T, T)
            mask = torch.cat([ok[:, :, None].expand(-1, -1, T, -1), new], -1)          # (B, Hkv, T, n+T)
            mask = mask.repeat_interleave(self.G, dim=1)                              # (B, H, T, n+T)
            new_slots = (t0 + torch.arange(T, device=self.dev)).expand(self.B, ok.shape[1], T)
            slots = torch.cat([self.idx.pop(layer), new_slots], -1)                   # (B, Hkv, n+T)
            if T == 1:
                self.fetched[layer] += (ok.sum((1, 2)) / (ok.shape[1] * self.length.clamp(min=1))).mean()   # no sync
        out = M.attention(q, kd, vd, mask)                  # queued before the host gathers for i+1
        if T > 1 and layer >= self.pol.dense_layers and self.pol.layer_budget == "prompt":   # the need, at prefill
            self.need[layer] = float(SK.needed_share(M.attention_probs(q[:, :, -64:], kd, mask[..., -64:, :]), mask[..., -64:, :]))
        if ahead:
            self.issue(layer + 1, nxt)                      # its copy overlaps this layer's attention and MLP
        self.observe(layer, q, kd, mask, slots)
        if self.pol.measure_recall and T == 1 and self.sparse(layer):
            self.recall[layer] += self.recall_of(layer, q, k, slots, mask)
        self.store.append(layer, t0, k, v)
        return out

    def end(self):
        if self.T == 1:
            self.decode_steps += 1
        elif self.pol.layer_budget == "prompt" and self.need.any():    # a prefill chunk measured the layers' need
            self.share = SK.layer_shares(self.need, self.pol.dense_layers)
        self.store.ledger.step_done()
        super().end()

    def observe(self, layer, q, kd, mask, slots):  # what a policy learns from a layer's attention
        pass

    def recall_of(self, layer, q, k, slots, mask):
        """Attention mass (true, full attention) on the tokens the layer attended to."""
        kall = self.store.keys(layer, self.t0).to(self.dev, q.dtype)                   # (B, Hkv, t0, d)
        kall = torch.cat([kall, k], 2)
        full_mask = self.valid[:, None, None, :self.t0 + 1]
        p = M.attention_probs(q, kall, full_mask)                                   # (B, H, 1, t0+1)
        chosen = torch.zeros_like(p, dtype=torch.bool)
        chosen.scatter_(-1, slots.repeat_interleave(self.G, 1)[:, :, None], mask)
        return ((p * chosen).sum(-1).mean()).item()


class InfiniGen(OffloadCache):
    name = "infinigen"

    def __init__(self, model, pol, batch, slots, device, dtype, partial=None):
        super().__init__(model, pol, batch, slots, device, dtype)
        cfg = self.cfg
        self.P = list(partial or [None] * cfg.n_layers)    # per layer (Hkv, d, m), from calibration
        self.Wp = [None] * cfg.n_layers                     # per layer (H*m, C) and bias: the partial query weight
        # Columns alone can be projected and rotated when no rotation mixes them with others.
        self.plane_closed = pol.skew == "planes" or (pol.skew == "none" and cfg.arch == "opt")
        m = SK.n_columns(pol.partial_ratio, cfg.head_dim, pol.skew == "planes")
        self.kpart = torch.zeros(cfg.n_layers, batch, cfg.n_kv_heads, slots, m, device=device, dtype=dtype)  # (L, B, Hkv, S, m)

    def observe(self, layer, q, kd, mask, slots):
        if self.P[layer] is None and layer >= self.pol.dense_layers:   # calibrate on the prompt itself
            keep = self.valid[:, self.t0:self.t0 + self.T]
            qc = q.transpose(1, 2)[keep]                                         # (N, H, d)
            kc = kd[:, :, -self.T:].transpose(1, 2)[keep]                        # (N, Hkv, d)
            self.P[layer] = SK.make_skew(qc, kc, self.pol.skew, self.pol.partial_ratio)[0].to(self.dev, q.dtype)
        if self.Wp[layer] is None and self.P[layer] is not None and self.plane_closed:
            wq = self.model.layers[layer].attn.wq
            self.Wp[layer] = SK.partial_query_weight(wq.weight, wq.bias, self.P[layer])
        if self.P[layer] is not None:                                   # the partial key cache grows
            self.kpart[layer, :, :, self.t0:self.t0 + self.T] = kd[:, :, -self.T:] @ self.P[layer][None]   # (B, Hkv, T, m)

    def select(self, layer, q, x, rope):
        qp = partial_query(x, self.model.layers[layer].attn, rope, self.P[layer], self.Wp[layer])
        s = speculate(qp, self.kpart[layer, :, :, :self.t0], self.scale, self.allowed)
        return threshold_select(s, self.pol.alpha, self.count(layer), self.allowed, self.kmax)


class Oracle(OffloadCache):
    name, ahead = "oracle", False

    def select(self, layer, q, x, rope):
        kall = self.store.keys(layer, self.t0).to(self.dev, q.dtype)                      # (B, Hkv, t0, d)
        s = speculate(q.view(self.B, -1, self.G, q.shape[-1]), kall, self.scale, self.allowed)   # (B, Hkv, t0)
        return topk_mask(s, self.count(layer), self.allowed, self.kmax)


class Streaming(OffloadCache):
    name, ahead = "streaming", False

    def begin(self, valid_new):  # the sinks stay even past a small budget: they bound a selection too
        pos = super().begin(valid_new)
        self.kmax = max(self.kmax, self.pol.sinks)
        return pos

    def select(self, layer, q, x, rope):
        rank = self.allowed.long().cumsum(-1)                                     # 1.. for real tokens
        k = self.count(layer)
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

    def observe(self, layer, q, kd, mask, slots):
        p = M.attention_probs(q, kd, mask)                                        # (B, H, T, n)
        p = p.view(self.B, -1, self.G, *p.shape[2:]).sum((2, 3))                  # (B, Hkv, n)
        if slots is None:
            self.score[layer, :, :, :p.shape[-1]] += p
        else:
            self.score[layer].scatter_add_(-1, slots, p * (slots < self.S))

    def select(self, layer, q, x, rope):
        k = self.count(layer)
        n_recent = (k.double() * self.pol.recent).long()
        rank = self.allowed.long().cumsum(-1)
        recent = rank > (self.length - n_recent)[:, None, None]
        alive = self.alive[layer, :, :, :self.t0] & self.allowed
        heavy = topk_mask(self.score[layer, :, :, :self.t0], k - n_recent, alive & ~recent, self.kmax)
        sel = heavy | (recent & self.allowed)
        self.alive[layer, :, :, :self.t0] &= sel                                   # evicted for good
        return sel


CACHES = {"offload": OffloadCache, "infinigen": InfiniGen, "h2o": H2O, "streaming": Streaming, "oracle": Oracle}


def make_cache(model, pol: Policy, batch, slots, partial=None):
    """The policy's cache for `batch` sequences of up to `slots` tokens (partial: offline skew)."""
    p = next(model.parameters())
    if pol.name == "full":
        return M.DenseCache(model.cfg, batch, slots, p.device, p.dtype)
    extra = (partial,) if pol.name == "infinigen" else ()
    return CACHES[pol.name](model, pol, batch, slots, p.device, p.dtype, *extra)


def calibrate(model, tokens, pol: Policy):
    """Offline skew: the partial maps P per layer from a calibration text (1, T) instead of the prompt."""
    cache = make_cache(model, Policy("infinigen", skew=pol.skew, partial_ratio=pol.partial_ratio), 1, tokens.shape[1])
    prefill(model, cache, tokens.to(cache.dev), torch.ones_like(tokens, dtype=torch.bool, device=cache.dev))
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
        logits = model(tokens[:, s:s + chunk], cache, valid[:, s:s + chunk])
        if progress and T > chunk:
            print(f"\r  prefill {min(s + chunk, T)}/{T} tokens", end="", file=sys.stderr, flush=True)
    if progress and T > chunk:
        print(file=sys.stderr)
    return logits[:, -1]


@torch.no_grad()
def decode_one(model, cache, tok):
    """One new token per sequence (B,) -> logits (B, V)."""
    return model(tok[:, None], cache)[:, 0]


@torch.no_grad()
def generate(model, prompts, pol=None, max_new=64, temperature=0.0, top_p=1.0, seed=0, stop_ids=(),
             on_token=None, partial=None, progress=False):
    """Greedy or sampled generation for a batch of token lists (left-padded). Returns (outputs, stats)."""
    pol = pol or Policy()
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda d: None)
    B, T = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("an empty prompt: give at least one token (or drop --no-chat)")
    if T + max_new > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens + {max_new} new tokens exceeds the model's context of {model.cfg.max_seq_len}")
    tokens = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):], valid[b, T - len(p):] = torch.tensor(p), True
    cache = make_cache(model, pol, B, T + max_new, partial)
    gen = torch.Generator(device=dev).manual_seed(seed)
    sync(dev); t = time.perf_counter()
    logits = prefill(model, cache, tokens.to(dev), valid.to(dev), progress=progress)
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


# --- Command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.exit(f"error: {message}")


def positive_int(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def build_parser():
    p = Parser(description="InfiniGen reference engine: generate with a KV-cache policy.")
    a = p.add_argument
    a("--model", default=None, help="model folder or hub id (default: the built-in SmolLM2-135M-Instruct)")
    a("--prompt", action="append", help="prompt text (repeat for a batch)")
    a("--prompt-file", help="read the prompt from a file")
    a("--max-new-tokens", type=positive_int, default=128)
    a("--temperature", type=float, default=0.0, help="0 = greedy")
    a("--top-p", type=float, default=1.0)
    a("--seed", type=int, default=0)
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="default: float32 on CPU, float16 on CUDA")
    a("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat format")
    a("--json", action="store_true", help="print one JSON object: text, tokens, stats")
    a("--policy", choices=POLICIES, default="full")
    d = Policy()
    a("--budget", type=float, default=d.budget, help="past tokens per sparse layer: fraction (<=1) or count")
    a("--alpha", type=float, default=d.alpha, help="infinigen: keep speculated scores above max - alpha")
    a("--partial-ratio", type=float, default=d.partial_ratio, help="infinigen: share of head dims in partial keys")
    a("--skew", choices=SK.MODES, default=d.skew)
    a("--dense-layers", type=int, default=d.dense_layers)
    a("--recent", type=float, default=d.recent, help="h2o/streaming: share of the budget for recent tokens")
    a("--cpu-kv-capacity", type=float, default=0, help="CPU pool: tokens per sequence (>1) or fraction of context")
    a("--eviction", choices=["fifo", "lru", "counter"], default=d.eviction)
    a("--layer-budget", choices=["uniform", "prompt"], default=d.layer_budget, help="prompt: share the budget among sparse layers by the need measured at prefill")
    a("--measure-recall", action="store_true", help="also compute full attention to report captured mass")
    a("--calib", help="infinigen: calibrate the skew offline on this text file (default: on the prompt)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
        dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype or ("float16" if dev.type == "cuda" else "float32"))
        pol = Policy(args.policy, args.budget, args.alpha, args.partial_ratio, args.skew, args.dense_layers,
                     args.recent, capacity=args.cpu_kv_capacity, eviction=args.eviction,
                     measure_recall=args.measure_recall, layer_budget=args.layer_budget)
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
        if missing := [f for f in (args.prompt_file, args.calib) if f and not os.path.isfile(f)]:
            raise ValueError(f"file not found: {missing[0]}")
        read = lambda f: open(f, encoding="utf-8", errors="replace").read()
        prompts = [read(args.prompt_file)] if args.prompt_file else args.prompt or ["Explain in two sentences why the sky is blue."]
        model, tok = M.load_with_tokenizer(args.model, dev, dtype)
        ids = [tok.encode(p, chat=not args.no_chat) for p in prompts]
        partial = None
        if args.calib and pol.name == "infinigen":
            partial = calibrate(model, torch.tensor([tok.encode(read(args.calib), chat=False)[:1024]]), pol)
        stream, acc = len(ids) == 1 and not args.json, []

        def on_token(nxt):  # print text as it is produced (whole characters only)
            before = tok.decode(acc)
            acc.append(int(nxt[0]))
            if not tok.decode(acc).endswith("\ufffd"):
                print(tok.decode(acc)[len(before.rstrip("\ufffd")):], end="", flush=True)

        stop = list(model.cfg.eos_ids) + tok.stop_ids
        out, st = generate(model, ids, pol, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop,
                           on_token if stream else None, partial, progress=not args.json)
    except (M.ModelError, OffloadError, ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    texts = [tok.decode(o) for o in out]
    if args.json:
        one = len(texts) == 1
        print(json.dumps({"text": texts[0] if one else texts, "tokens": out[0] if one else out, "stats": st}))
        return
    print("" if stream else "\n---\n".join(texts))
    print(f"[{args.policy}] prefill {st['prefill_s']:.2f}s, decode {st['decode_steps']} steps in {st['decode_s']:.2f}s "
          f"({st['tokens_per_s']} tok/s), KV {st['kv_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    if "fetched_fraction_per_layer" in st:
        f = st["fetched_fraction_per_layer"]
        print(f"  fetched {sum(f) / len(f):.3f} of the KV per layer on average, "
              f"{st['h2d_bytes_per_step'] / 2**20:.2f} MiB host->device per step", file=sys.stderr)


if __name__ == "__main__":
    main()
