"""The gather kernel: the selected K, V rows go from the CPU store straight into a device buffer;
the put kernel writes the new tokens' rows into the store through their slots on the device.

On a GPU the store is pinned host memory, which a kernel can read through its host pointer (unified
addressing): each program reads BLOCK selected rows over PCIe and writes them where attention
reads them. The indices never leave the device, so the host waits for nothing. The same kernel runs
on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests its logic; CI also
compiles both for an H100 (sm_90), no GPU needed, and checks that rows move in 16-byte loads and stores.
Shapes: B batch, Hkv KV heads, n rows per (sequence, KV head), d head dim, R = 2d (K and V).
"""
import functools

import torch
import triton
import triton.language as tl


# --- Gather kernel
@triton.jit
def gather_rows_kernel(src, idx, ok, dst, n, BH, R: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr,
                       STEPS: tl.constexpr):
    """dst row r = j * BH + bh (destination (n, B, Hkv) order) <- src row idx[bh, j] * BH + bh,
    where ok[bh, j]; rows that are not ok are left as they were (attention masks them). A program moves
    BLOCK rows, then the BLOCK rows one grid further on: STEPS blocks in all."""
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


# A program's loads wait about a microsecond on PCIe, holding its place on an SM all the while. One program
# per block of rows (thousands) filled every SM, and the compute stream's kernels queued behind the copy
# (H200: a 7B layer took its copy's time plus its own). With a quarter of a program per SM the gather alone
# moves as much (42 GB/s, 256-byte rows), and the 7B step at 10% fell from 1.86x its PCIe floor (one per SM)
# to 1.29x.
PER_SM = 0.25     # programs per SM, a fraction too (0: one per BLOCK rows); bench.py --gather-per-sm


@functools.cache
def sm_count(device):  # streaming multiprocessors of a GPU; the interpreter (CPU): 4 "programs"
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gather_rows(src, idx, ok, dst, block=32, programs=None):
    """src (S, B, Hkv, 2, d) one layer of the store; idx, ok (B, Hkv, n) slots and which are wanted;
    dst (>= n, B, Hkv, 2, d) on the device: dst[j, b, h] = src[idx[b, h, j], b, h] where ok.
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
    gather_rows_kernel[(grid,)](src, idx.contiguous(), ok.contiguous(), dst, n, B * Hkv,
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
