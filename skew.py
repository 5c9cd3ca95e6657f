"""Skewing, partial columns, speculation and selection: pure functions.

For any orthogonal A (d, d), (qA)(kA)^T = q k^T, so rotating queries and keys changes no score.
With A from the SVD of a head's calibration queries (Q = U S V^T, A = V) the columns of QA carry
their energy in decreasing order, and a few of them predict the scores. Shapes: N calibration
tokens, H query heads, Hkv key/value heads, G = H // Hkv, d head dim, m partial columns.
"""
import math

import torch
import torch.nn.functional as F

from model import apply_rope

MODES = ("none", "svd", "planes")


# --- Grouping (GQA)
def group_queries(q, n_kv):
    """q (N, H, d) -> (Hkv, G*N, d): the queries of the heads that share a KV head, stacked."""
    N, H, d = q.shape
    return q.view(N, n_kv, H // n_kv, d).permute(1, 2, 0, 3).reshape(n_kv, -1, d)


# --- Skew
def svd_skew(qg):
    """qg (Hkv, M, d) -> A (Hkv, d, d) orthogonal, columns in decreasing singular value."""
    square = qg.shape[1] < qg.shape[2]                                    # M < d: V must still be (d, d)
    _, _, vh = torch.linalg.svd(qg.double(), full_matrices=square)       # never the (M, M) U otherwise
    return vh.transpose(-1, -2).to(qg.dtype)


def apply_skew(x, A):
    """x (B, h, T, d) with h a multiple of Hkv; A (Hkv, d, d): each head times its KV head's A."""
    B, h, T, d = x.shape
    n_kv = A.shape[0]
    return (x.reshape(B, n_kv, (h // n_kv) * T, d) @ A[None].to(x.dtype)).view(B, h, T, d)


# --- Partial columns
def column_energy(qg, kg):
    """Per column, mean |q| times mean |k|: how much the column can move scores. (Hkv, d)."""
    return qg.abs().mean(1) * kg.abs().mean(1)


def plane_energy(qg, kg):
    """Per RoPE plane (dims j and j + d/2), mean plane norm of q times that of k. (Hkv, d/2)."""
    half = qg.shape[-1] // 2
    norm = lambda x: (x[..., :half] ** 2 + x[..., half:] ** 2).sqrt().mean(1)
    return norm(qg) * norm(kg)


def n_columns(ratio, d, planes):  # m: how many columns a partial ratio keeps (even for planes)
    return 2 * max(1, round(ratio * d / 2)) if planes else max(1, round(ratio * d))


def choose_columns(qg, kg, ratio, planes=False):
    """The m = ratio*d columns with the most energy, per KV head, sorted. (Hkv, m) long.
    planes=True picks whole RoPE planes, which RoPE never mixes with other dims."""
    d = qg.shape[-1]
    m = n_columns(ratio, d, planes)
    if planes:
        top = plane_energy(qg, kg).topk(m // 2, dim=-1).indices                 # (Hkv, m/2)
        cols = torch.cat([top, top + d // 2], dim=-1)
    else:
        cols = column_energy(qg, kg).topk(m, dim=-1).indices
    return cols.sort(dim=-1).values


def make_skew(q, k, mode, ratio):
    """From calibration q (N, H, d) and k (N, Hkv, d) (post-RoPE for Llama): the partial map
    P (Hkv, d, m) = A[:, :, cols], so that partial queries and keys are q @ P and k @ P."""
    if mode not in MODES:
        raise ValueError(f"unknown skew mode {mode!r} (choose from {', '.join(MODES)})")
    n_kv, d = k.shape[1], k.shape[2]
    qg, kg = group_queries(q.float(), n_kv), k.float().transpose(0, 1)      # (Hkv, G*N, d), (Hkv, N, d)
    A = svd_skew(qg) if mode == "svd" else torch.eye(d, device=qg.device).expand(n_kv, d, d)
    cols = choose_columns(qg @ A, kg @ A, ratio, planes=mode == "planes")
    return torch.gather(A, 2, cols[:, None, :].expand(n_kv, d, cols.shape[1])), A


# --- Partial query weight
def partial_query_weight(wq, bq, P):
    """When P only picks columns (A = I): the rows of Wq (H*d, C) and its bias that make those
    columns, per head, so x @ Wp.T + bp is the partial query itself, and which columns each query head
    keeps (for RoPE). -> (H*m, C), (H*m,) or None, (H, m)."""
    n_kv, d, m = P.shape
    H = wq.shape[0] // d
    cols = P.argmax(1).repeat_interleave(H // n_kv, 0)                        # (H, m) dims kept per head
    rows = (torch.arange(H, device=wq.device)[:, None] * d + cols).reshape(-1)
    return wq[rows], None if bq is None else bq[rows], cols


# --- Speculation
def partial_query(x, attn, rope, P, Wp=None):
    """The next layer's query in the partial columns: x (B, 1, C) -> (B, Hkv, G, m).
    With a partial query weight Wp (its weight, bias and columns: whole RoPE planes, no rotation) only m
    of the d columns are computed: RoPE acts inside each plane, so it can rotate the partial query alone."""
    Hkv, d, m = P.shape
    if Wp is None:                                                              # skewed: full q, then A
        q = attn.query(x, rope)                                                  # (B, H, 1, d)
        return q.view(q.shape[0], Hkv, -1, d) @ P[None]                          # (B, Hkv, G, m)
    B, T, _ = x.shape
    w, b, cols = Wp                                                             # cols (H, m)
    qp = F.linear(x, w, b).view(B, T, -1, m).transpose(1, 2)                   # (B, H, T, m)
    if rope is not None:                     # cos and sin (2, B, 1, T, d) at the kept columns, in one gather
        H = cols.shape[0]
        cs = rope.expand(-1, -1, H, -1, -1).gather(-1, cols[None, None, :, None].expand(2, B, H, T, m))
        qp = apply_rope(qp, *cs)                                                # cs (2, B, H, T, m)
    return qp.reshape(B, Hkv, -1, m)


def partial_keys(k, P, Wp=None):
    """New keys k (B, Hkv, T, d) in the partial columns: k @ P (B, Hkv, T, m). With a partial query weight
    (P only picks columns) the columns themselves, one gather: the same numbers (the product adds zeros)."""
    if Wp is None:
        return k @ P[None]
    cols = Wp[2].view(P.shape[0], -1, P.shape[2])[:, 0]          # (Hkv, m): the G rows of a KV head agree
    return k.gather(-1, cols[None, :, None].expand(k.shape[0], -1, k.shape[2], -1))


def speculate(qp, kpart, scale, allowed=None):
    """Approximate scores: partial queries (B, Hkv, G, m) times partial keys (B, Hkv, t, m) -> (B, Hkv, t):
    the log of the attention probability a token gets, summed over the G query heads sharing its KV head
    (allowed (B, 1|Hkv, t) masks the softmax). With G = 1 this is the score minus a constant per head, so
    "within alpha of the best" keeps the paper's meaning; with G > 1 a token that one head needs counts.
    The queries are scaled before the product, which gives float16 sqrt(d) times more room; a product still
    past its range is inf, and inf - inf is NaN: such scores are clamped to the largest finite value, so a
    selection is never made from NaN. The scores are float32 (float64 for a float64 model)."""
    s = (qp * scale) @ kpart.transpose(-1, -2)                                   # (B, Hkv, G, t)
    big = torch.finfo(s.dtype).max
    s = s.clamp(-big, big).to(torch.promote_types(s.dtype, torch.float32))
    if allowed is not None:
        s = torch.where(allowed[:, :, None], s, float("-inf"))
    return summed(s)


def summed(z):  # partial scores of the G query heads (B, Hkv, G, t) -> a token's score (B, Hkv, t)
    return z.log_softmax(-1).logsumexp(2) if z.dim() == 4 else z


def speculate_ahead(x, attn, rope, P, Wp, kpart, scale, allowed):
    """The next layer's speculated scores (B, Hkv, t): partial_query, then speculate. With SLOTS "fused", a
    partial query weight and one token, the partial query's product, then one kernel (kernel.partial_scores:
    RoPE, the scale, the product and the mask, in float32) give the heads' partial scores z (B, Hkv, G, t),
    which the selection kernel sums as speculate does."""
    if SLOTS == "fused" and Wp is not None and x.shape[1] == 1:
        from offload import device_kernel
        qp = F.linear(x, Wp[0], Wp[1])                                                   # (B, 1, H*m)
        return device_kernel("partial_scores", cuda=x.is_cuda)(qp, Wp[2], rope, scale, kpart, allowed)
    return speculate(partial_query(x, attn, rope, P, Wp), kpart, scale, allowed)


# --- Selection math
CHECK_BOUNDS = True   # on a CPU, a bound the host gives is checked (reading the count would sync CUDA)
SLOTS = "torch"       # top_slots in torch operations, or "kernel": one Triton kernel (kernel.py), or "fused":
#                       InfiniGen's partial scores too (speculate_ahead); --slots
SLOTS_ROW_MAX = 16384  # the kernel holds a row of scores in registers: longer ones take the torch path


def top_slots(s, k, kmax, alpha=math.inf):
    """s (B, Hkv, w) scores, -inf where not allowed (or the heads' partial scores (B, Hkv, G, w), summed);
    k (B,) per sequence -> idx, ok (B, Hkv, n): each head's best k tokens among those within alpha of its
    best, their slots in ascending order, then padding (ok False, slot w - 1). n = min(kmax, w), at least
    1: kmax bounds k on the host, so no shape waits for the device. One top-k over w and one sort over n:
    the engine's selection, a handful of kernels."""
    w = s.shape[-1]
    if CHECK_BOUNDS and not s.is_cuda and k.numel() and min(int(k.max()), w) > kmax:
        raise ValueError(f"a selection of {int(k.max())} tokens per KV head exceeds its bound of {kmax}")
    n = max(min(kmax, w), 1)
    if SLOTS != "torch" and s.dtype == torch.float32 and w <= SLOTS_ROW_MAX:   # one kernel (ties aside,
        # the same slots; chapter 17)
        from offload import device_kernel
        return device_kernel("top_slots", cuda=s.is_cuda)(s, k, n, alpha)
    top, slot = summed(s).topk(n, dim=-1)                                           # (B, Hkv, n) best first
    lo = torch.finfo(top.dtype).min                                              # -inf (not allowed): never
    least = lo if alpha == math.inf else (top[..., :1] - alpha).clamp(min=lo)     # alpha inf: the cap decides
    keep = (torch.arange(n, device=s.device) < k[:, None, None]) & (top >= least)
    key = torch.where(keep, slot, w).sort(-1).values                          # kept slots first, in order
    return key.clamp(max=w - 1), key < w                                                       # (B, Hkv, n)


def threshold_slots(s, alpha, cap, kmax, mean=False):
    """Tokens whose score is within alpha of the best, at most cap (B,) of them: top_slots' (idx, ok).
    s (B, Hkv, t): -inf where not allowed. mean: the authors' rule instead, every head its best n, n the
    mean over the heads of how many of their tokens are within alpha (rounded down, at most cap; their
    speculate_attention means over the batch)."""
    if mean:
        s = summed(s)
        near = (s >= s.amax(-1, keepdim=True) - alpha) & (s > float("-inf"))                 # (B, Hkv, t)
        cap, alpha = torch.minimum(cap, near.sum(-1).double().mean(-1).long()), math.inf    # (B,)
    return top_slots(s, cap, kmax, alpha)


# --- Selections as masks (H2O, streaming, the tutorial's labs)
def as_mask(idx, ok, w):
    """Slots (B, Hkv, n) where ok -> (B, Hkv, w) bool: the padding lands in an extra column, dropped."""
    mask = torch.zeros(*idx.shape[:-1], w + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, torch.where(ok, idx, w), True)[..., :w]


def threshold_select(s, alpha, cap, allowed, kmax=None, mean=False):
    """threshold_slots as a mask (B, Hkv, t) bool, allowed (B, 1|Hkv, t) masking s."""
    s = s.masked_fill(~allowed, float("-inf"))
    kmax = (int(cap.max()) if cap.numel() else 0) if kmax is None else kmax
    return as_mask(*threshold_slots(s, alpha, cap, kmax, mean), s.shape[-1])


def topk_mask(scores, k, allowed, kmax=None):
    """scores (B, Hkv, S), k (B,) per sequence, allowed (B, 1|Hkv, S) -> bool (B, Hkv, S), k best allowed.
    kmax: k.max() if the caller knows it on the host (reading it from a device k waits for the device)."""
    s = scores.masked_fill(~allowed, float("-inf"))
    kmax = (int(k.max()) if k.numel() else 0) if kmax is None else kmax
    if kmax == 0:
        return torch.zeros_like(s, dtype=torch.bool)
    top = s.topk(min(kmax, s.shape[-1]), dim=-1).indices                                   # (B, Hkv, kmax)
    keep = (torch.arange(top.shape[-1], device=s.device) < k[:, None, None]).expand_as(top)
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, keep) & allowed


def to_index(sel, n=None):
    """sel (B, Hkv, S) bool -> idx, ok (B, Hkv, n): each head's selected slots in ascending order, then
    (ok False) the lowest others as padding; n = the max count, or a bound on it known on the host.
    (A policy whose rule is a top-k gives top_slots' slots instead: no mask, no second top-k.)"""
    S = sel.shape[-1]
    if n is None or (CHECK_BOUNDS and not sel.is_cuda):   # reading the count waits for the device
        most = int(sel.sum(-1).max())
        if n is not None and most > n:
            raise ValueError(f"a selection of {most} tokens per KV head exceeds its bound of {n}")
    n = max(most if n is None else min(n, S), 1)
    key = torch.where(sel, 0, S) + torch.arange(S, device=sel.device)      # selected first, each in order
    first = key.topk(n, dim=-1, largest=False)                              # ascending: sorted by key
    return first.indices, first.values < S                                              # (B, Hkv, n)


# --- Layer shares of the budget
NEED_QUERIES = 64    # the prompt's last queries whose attention the layer rule measures (needed_share)


def needed_share(p, mask, mass=0.9):
    """p (B, H, Tq, n) attention weights, mask (B, 1|Hkv|H, Tq, n) -> the mean share of its visible keys
    a query needs, heaviest first, to hold `mass` of its attention (queries that see one key skipped)."""
    need = (p.sort(-1, descending=True).values.cumsum(-1) < mass).sum(-1) + 1             # (B, H, Tq)
    seen = mask.sum(-1)                                                                    # (B, 1|Hkv|H, Tq)
    seen = seen.repeat_interleave(need.shape[1] // seen.shape[1], 1)     # (B, H, Tq): per KV head's G heads
    return (need / seen)[seen > 1].mean().nan_to_num(0.0)


def layer_shares(need, first, lo=0.2, hi=4.0, budget=None):
    """need (L,) -> share (L,): layers first.. split the budget in proportion to their need (each ratio
    to the mean clamped to lo..hi, then all rescaled to mean 1); the dense layers before `first` keep 1.
    With a fractional budget no share exceeds 1 / budget (a layer cannot fetch more than its whole past):
    what a capped layer cannot use goes to the others, in proportion, so the mean stays 1 (a token count
    as the budget: no fixed cap, the past grows)."""
    share = torch.ones_like(need)
    w = (need[first:] / need[first:].mean()).clamp(lo, hi)
    w, cap = w / w.mean(), 1 / budget if budget is not None and budget <= 1 else math.inf
    while (w > cap).any():                 # each round caps at least one more layer: at most L rounds
        full = w >= cap
        w = torch.where(full, w.clamp(max=cap), w * (len(w) - cap * full.to(w.dtype).sum()) / w[~full].sum())
    share[first:] = w
    return share


# --- Folding into OPT weights
@torch.no_grad()
def fold_into_weights(attn, A):
    """OPT (no RoPE): Wq <- Wq A, Wk <- Wk A per head (with biases), so q and k come out skewed.
    attn is model.Attention with H == Hkv; A (H, d, d). Scores and outputs are unchanged."""
    H, d = A.shape[0], A.shape[1]
    for lin in (attn.wq, attn.wk):
        w = lin.weight.view(H, d, -1)                                         # (H, d_out, C)
        lin.weight.copy_((A.transpose(1, 2).to(w.dtype) @ w).view_as(lin.weight))
        if lin.bias is not None:
            b = lin.bias.view(H, d, 1)
            lin.bias.copy_((A.transpose(1, 2).to(b.dtype) @ b).view_as(lin.bias))
