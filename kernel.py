"""The gather kernel: the selected K, V rows go from the CPU store straight into a device buffer;
the put kernel writes the new tokens' rows into the store through their slots on the device; the
selection kernel chooses InfiniGen's slots without a sort (skew.SLOTS = "kernel"; off by default), and
with the partial score kernel speculates a layer in a matrix product and two kernels (SLOTS = "fused").

On a GPU the store is pinned host memory, which a kernel can read through its host pointer (unified
addressing): each program reads BLOCK selected rows over PCIe and writes them where attention
reads them. The indices never leave the device, so the host waits for nothing. The same kernel runs
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests its logic; CI also
compiles each for an H100 (sm_90), no GPU needed, and checks that rows move in 16-byte loads and stores.
Shapes: B batch, Hkv KV heads, n rows per (sequence, KV head), d head dim, R = 2d (K and V); H query heads,
G = H / Hkv, C model width, m partial columns, w slots speculated over.
"""
import functools
import math

import torch
import triton
import triton.language as tl


# --- Gather kernel
@triton.jit
def gather_rows_kernel(src, idx, ok, dst, count, n, BH, R: tl.constexpr, RP: tl.constexpr,
                       BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """dst row r = j * BH + bh (destination (n, B, Hkv) order) <- src row idx[bh, j] * BH + bh,
    where ok[bh, j]; rows that are not ok are left as they were (attention masks them). A program moves
    BLOCK rows, then the BLOCK rows one grid further on: STEPS blocks in all, and adds how many rows it
    moved to count (an int64 counter on the device; None: not counted)."""
    moved = 0
    for i in range(STEPS):
        r = (i * tl.num_programs(0) + tl.program_id(0)) * BLOCK + tl.arange(0, BLOCK)   # destination rows
        j, bh = r // BH, r % BH
        keep = r < n * BH
        keep = keep & (tl.load(ok + bh * n + j, mask=keep, other=0) != 0)    # only wanted rows cross the link
        slot = tl.load(idx + bh * n + j, mask=keep, other=0).to(tl.int64)    # the token's slot in the store
        col = tl.arange(0, RP)                                               # (RP,) K then V, padded to 2^k
        m = keep[:, None] & (col[None, :] < R)
        x = tl.load(src + (slot * BH + bh)[:, None] * R + col[None, :], mask=m)
        tl.store(dst + r.to(tl.int64)[:, None] * R + col[None, :], x, mask=m)
        moved += tl.sum(keep.to(tl.int32), 0)
    if count is not None:
        tl.atomic_add(count, moved.to(tl.int64))                             # one addition per program


# A program's loads wait about a microsecond on PCIe, holding its place on an SM all the while. One program
# per block of rows (thousands) filled every SM, and the compute stream's kernels queued behind the copy
# (H200: a 7B layer took its copy's time plus its own). With a quarter of a program per SM the gather alone
# moves as much (42 GB/s, 256-byte rows), and the 7B step at 10% fell from 1.86x its PCIe floor (one per SM)
# to 1.29x.
PER_SM = 0.25     # programs per SM, a fraction too (0: one per BLOCK rows); bench.py --gather-per-sm


@functools.cache
def sm_count(device):  # streaming multiprocessors of a GPU; the interpreter (CPU): 4 "programs"
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gather_rows(src, idx, ok, dst, count=None, block=32, programs=None):
    """src (S, B, Hkv, 2, d) one layer of the store; idx, ok (B, Hkv, n) slots and which are wanted;
    dst (>= n, B, Hkv, 2, d) on the device: dst[j, b, h] = src[idx[b, h, j], b, h] where ok; count (a
    one-element int64 tensor on the device, or None): plus the number of rows moved.
    programs: at most this many (None: PER_SM per SM of the device, at least one; 0: one per `block` rows)."""
    B, Hkv, n = idx.shape
    R = src.shape[-2] * src.shape[-1]
    if n == 0:
        return
    if programs is None:
        programs = max(1, round(PER_SM * sm_count(dst.device))) if PER_SM else 0
    blocks = triton.cdiv(n * B * Hkv, block)
    grid = min(blocks, programs or blocks)
    steps = triton.next_power_of_2(triton.cdiv(blocks, grid))   # 2^k: few compiles (extra ones masked)
    gather_rows_kernel[(grid,)](src, idx.contiguous(), ok.contiguous(), dst, count, n, B * Hkv,
                                R=R, RP=triton.next_power_of_2(R), BLOCK=block, STEPS=steps)


# --- Put kernel
@triton.jit
def put_rows_kernel(src, at, dst, T, BH, R: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr):
    """dst row at[t] * BH + bh <- src row r = t * BH + bh (source (T, B, Hkv) order): the new tokens'
    K, V written into their slots of the store, which may be pinned host memory."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)                   # (BLOCK,) source rows
    t, bh = r // BH, r % BH
    keep = r < T * BH
    slot = tl.load(at + t, mask=keep, other=0).to(tl.int64)              # the token's slot in the store
    col = tl.arange(0, RP)
    m = keep[:, None] & (col[None, :] < R)
    x = tl.load(src + r.to(tl.int64)[:, None] * R + col[None, :], mask=m)
    tl.store(dst + (slot * BH + bh)[:, None] * R + col[None, :], x, mask=m)


def put_rows(src, at, dst, block=32):
    """src (T, B, Hkv, 2, d) contiguous on the device, at (T,) slots on the device, dst (S, B, Hkv, 2, d)
    one layer of the store: dst[at[t]] = src[t]. The slots are read on the device, never by the host."""
    T, B, Hkv = src.shape[:3]
    R = src.shape[-2] * src.shape[-1]
    grid = (triton.cdiv(T * B * Hkv, block),)
    put_rows_kernel[grid](src, at.contiguous(), dst, T, B * Hkv,
                          R=R, RP=triton.next_power_of_2(R), BLOCK=block)


# --- Selection kernel
@triton.jit
def top_slots_kernel(s, k, idx, ok, w, n, Hkv, alpha, FINITE: tl.constexpr, W: tl.constexpr,
                     G: tl.constexpr):
    """skew.top_slots for one (sequence, KV head) row of scores s (rows, w) per program, the row held in
    registers (W >= w, a power of two): of the scores within alpha of the row's best, the best
    kk = min(k[b], n); their slots ascending into idx (rows, n), ok True, then padding (slot w - 1, ok
    False). The kk-th best is found by a binary search over the scores' bits, not by sorting: a float32's
    bits read as an integer keep the order of the numbers once a negative one's are flipped (-0.0 taken
    as 0.0 first), so 32 counts find the largest key that kk scores reach. Of the scores tied with the
    kk-th best, the first are kept. G > 0: s holds G rows of partial scores z (the G query heads of the KV
    head), and a token's score is skew.speculate's: the log of its softmax weight, summed over the G heads."""
    row = tl.program_id(0)
    col = tl.arange(0, W)
    if G == 0:
        x = tl.load(s + row.to(tl.int64) * w + col, mask=col < w, other=float("-inf"))   # (W,) the scores
    else:
        x = tl.full((W,), float("-inf"), tl.float32)
        for g in range(G):
            z = tl.load(s + (row.to(tl.int64) * G + g) * w + col, mask=col < w, other=float("-inf"))
            top = tl.max(z, 0)
            z = z - (top + tl.log(tl.sum(tl.exp(z - top), 0)))         # log softmax (NaN: nothing allowed)
            hi, lo = tl.maximum(x, z), tl.minimum(x, z)                  # x = log(exp(x) + exp(z)):
            gap = lo - tl.maximum(hi, -3.4028234663852886e38)            # (-inf where both are)
            x = tl.where(hi == float("-inf"), hi, hi + tl.log(1 + tl.exp(gap)))
    least = -3.4028234663852886e38                                      # float32's lowest: -inf never counts
    if FINITE:
        least = tl.maximum(tl.max(x, 0) - alpha, least)                 # within alpha of the best
    b = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)             # -0.0 ties with 0.0, as in torch
    key = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)                # (W,) in the scores' order
    key = tl.where(x >= least, key, -2**31 - 1)                         # too far, -inf, NaN: below all
    kk = tl.minimum(tl.load(k + row // Hkv), n)                         # tokens to keep
    lo, hi = tl.full((), -2**31, tl.int64), tl.full((), 2**31, tl.int64)   # the kk-th best key: in [lo, hi)
    for _ in range(32):
        mid = (lo + hi) >> 1
        enough = tl.sum((key >= mid).to(tl.int32), 0) >= kk
        lo, hi = tl.where(enough, mid, lo), tl.where(enough, hi, mid)
    tie = key == lo                                                     # tied with the kk-th best
    room = kk - tl.sum((key > lo).to(tl.int32), 0)                      # how many of them are kept
    keep = (key > lo) | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))
    before = tl.cumsum(keep.to(tl.int32), 0)                            # kept up to here
    at = tl.where(keep, before - 1, tl.sum(keep.to(tl.int32), 0) + col - before)   # kept slots first, in
    out = row.to(tl.int64) * n + at                                     # order, then the rest as padding
    tl.store(idx + out, tl.where(keep, col, w - 1).to(tl.int64), mask=at < n)
    tl.store(ok + out, keep, mask=at < n)


def top_slots(s, k, n, alpha=math.inf):
    """s (B, Hkv, w) float32 scores on the device (-inf where not allowed), or (B, Hkv, G, w) partial scores,
    k (B,) tokens per sequence, n the width -> idx, ok (B, Hkv, n): skew.top_slots' selection as one kernel
    instead of a top-k, a sort and seven small operations (exactly the same except among tied scores);
    skew.SLOTS_ROW_MAX bounds w."""
    (B, Hkv), w = s.shape[:2], s.shape[-1]
    idx = torch.empty(B, Hkv, n, dtype=torch.int64, device=s.device)
    ok = torch.empty(B, Hkv, n, dtype=torch.bool, device=s.device)
    W = triton.next_power_of_2(max(w, n))
    top_slots_kernel[(B * Hkv,)](s.contiguous(), k.contiguous(), idx, ok, w, n, Hkv,
                                 0.0 if alpha == math.inf else float(alpha), FINITE=alpha != math.inf, W=W,
                                 G=s.shape[2] if s.dim() == 4 else 0,
                                 num_warps=4 if W <= 1024 else 8 if W <= 4096 else 16)
    return idx, ok


# --- Speculation kernel
@triton.jit
def partial_scores_kernel(qp, cols, cs, kp, allowed, z, B, Hkv, D, w, k_row, a_b, a_h, scale, G: tl.constexpr,
                          GP: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, TB: tl.constexpr,
                          ROPE: tl.constexpr):
    """z[b, h, g, t] = scale * RoPE(qp[b, hG + g]) . kp[b, h, t] for TB slots t of one (sequence, KV head)
    per program, -inf where allowed[b, h, t] is False (a_h = 0: one mask for every head). RoPE turns the
    partial query's kept columns cols plane by plane: column j with its partner j + M/2 (mod M)."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    bi, h = bh // Hkv, bh % Hkv
    g, j, t = tl.arange(0, GP), tl.arange(0, MP), blk * TB + tl.arange(0, TB)
    row = (bh * G + g).to(tl.int64)[:, None]           # (GP, 1) rows of qp and z: (sequence, query head)
    m = (g[:, None] < G) & (j[None, :] < M)                                  # (GP, MP)
    q = tl.load(qp + row * M + j[None, :], mask=m, other=0).to(tl.float32)
    if ROPE:                                          # cs (2, B, d): cos, then -sin|sin (model.rope_tables)
        pair = tl.load(qp + row * M + (j[None, :] + M // 2) % M, mask=m, other=0)
        col = tl.load(cols + (h * G + g)[:, None] * M + j[None, :], mask=m, other=0)
        cos = tl.load(cs + bi * D + col, mask=m, other=0).to(tl.float32)
        sin = tl.load(cs + (B + bi) * D + col, mask=m, other=0).to(tl.float32)
        q = q * cos + pair.to(tl.float32) * sin
    k = tl.load(kp + bh.to(tl.int64) * k_row + t[:, None] * M + j[None, :],
                mask=(t[:, None] < w) & (j[None, :] < M), other=0).to(tl.float32)          # (TB, MP)
    s = tl.sum((q * scale)[:, None, :] * k[None, :, :], 2)                                 # (GP, TB)
    keep = tl.load(allowed + bi * a_b + h * a_h + t, mask=t < w, other=0) != 0
    s = tl.where(keep[None, :], s, float("-inf"))
    tl.store(z + row * w + t[None, :], s, mask=(g[:, None] < G) & (t[None, :] < w))     # z (B, Hkv, G, w)


def partial_scores(qp, cols, rope, scale, kpart, allowed):
    """qp (B, 1, H*m) a token's partial queries before RoPE (x @ Wp.T + bp: skew.partial_query_weight), cols
    (H, m) their columns, rope (2, B, 1, 1, d) or None, kpart (B, Hkv, w, m) the partial key cache (its first
    w slots), allowed (B, 1|Hkv, w) bool -> z (B, Hkv, G, w) float32: every query head's partial scores,
    -inf where not allowed (top_slots makes them skew.speculate's scores). One kernel where torch takes a
    gather, RoPE's four, the scale, the product, a clamp and a cast, and the mask; in float32 throughout."""
    (H, m), (B, Hkv, w) = cols.shape, kpart.shape[:3]
    G = H // Hkv
    assert kpart.stride(3) == 1 and kpart.stride(2) == m and kpart.stride(0) == Hkv * kpart.stride(1)
    z = torch.empty(B, Hkv, G, w, dtype=torch.float32, device=qp.device)
    TB = 64                                                            # slots per program
    cs = kpart if rope is None else rope.contiguous()                  # (unread without RoPE)
    partial_scores_kernel[(B * Hkv, triton.cdiv(w, TB))](
        qp.contiguous(), cols, cs, kpart, allowed, z, B, Hkv, 0 if rope is None else rope.shape[-1], w,
        kpart.stride(1), allowed.stride(0), allowed.stride(1) if allowed.shape[1] > 1 else 0, scale, G=G,
        GP=triton.next_power_of_2(G), M=m, MP=triton.next_power_of_2(m), TB=TB, ROPE=rope is not None)
    return z
