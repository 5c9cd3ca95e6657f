"""offload.py: sparse gathers bring exactly the selected rows for every (sequence, KV head), by the
host (CPU gather and one copy) and by the device (the Triton kernel, here under its interpreter) alike;
dense fetches the first t0 tokens, the ledger counts bytes, the bounded pool respects its capacity and
its eviction rule, and the memory preflight refuses absurd sizes. CPU (the same code paths as CUDA)."""
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offload
from infinigen import to_index
from offload import KVStore, OffloadError, Pool, kv_rows

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec("triton") is not None
GATHERS = ["host", pytest.param("device", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs triton"))]

# --- Strategies
@st.composite
def store_case(draw, pooled=False):
    """A store's shapes, the K, V appended in random chunks, and a random selection per layer."""
    B, Hkv, S = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 12))
    d = draw(st.sampled_from([1, 2, 4, 8]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    t0 = draw(st.integers(1, S))
    cuts = sorted(draw(st.sets(st.integers(1, t0 - 1), max_size=3))) if t0 > 1 else []
    flags = st.lists(st.booleans(), min_size=B * Hkv * t0, max_size=B * Hkv * t0)
    sels = [torch.tensor(draw(flags)).view(B, Hkv, t0) for _ in range(2)]
    case = dict(B=B, Hkv=Hkv, S=S, d=d, dtype=dtype, t0=t0, chunks=list(zip([0, *cuts], [*cuts, t0])),
                sels=sels, seed=draw(st.integers(0, 2**31 - 1)))
    if pooled:
        case["cap"] = draw(st.integers(1, S))
        case["policy"] = draw(st.sampled_from(["fifo", "lru", "counter"]))
    return case


def filled_store(c, n_layers=2, pool=None, gather="host"):
    """A store with layers' K, V (L, B, Hkv, t0, d) written through `append` in the case's chunks."""
    store = KVStore(n_layers, c["B"], c["S"], c["Hkv"], c["d"], CPU, c["dtype"], pool, gather)
    g = torch.Generator().manual_seed(c["seed"])
    K = torch.randn(n_layers, c["B"], c["Hkv"], c["t0"], c["d"], generator=g).to(c["dtype"])
    V = torch.randn(n_layers, c["B"], c["Hkv"], c["t0"], c["d"], generator=g).to(c["dtype"])
    for a, b in c["chunks"]:
        for layer in range(n_layers):
            store.append(layer, a, kv_rows(K[layer, :, :, a:b], V[layer, :, :, a:b]))
    return store, K, V


def rows(buf, n):  # the first n token rows of a (S, B, Hkv, d) device buffer: (n, B, Hkv, d)
    return buf[:n]


# --- to_index: selections with different counts per head, padded
@HYP
@given(c=store_case(), extra=st.none() | st.integers(0, 5))
def test_to_index_pads_variable_counts(c, extra):
    """Exact padding (n = the largest count), or a bound known on the host (n = count + extra)."""
    sel = c["sels"][0]
    n = max(int(sel.sum(-1).max()), 1)
    idx, ok = to_index(sel, None if extra is None else n + extra)
    n = n if extra is None else max(min(n + extra, sel.shape[-1]), 1)
    if int(sel.sum(-1).max()) > 1:                                 # a bound below the count is refused
        with pytest.raises(ValueError, match="exceeds its bound"):
            to_index(sel, int(sel.sum(-1).max()) - 1)
    assert idx.shape == ok.shape == (c["B"], c["Hkv"], n)
    assert torch.equal(ok.sum(-1), sel.sum(-1))
    assert ((idx >= 0) & (idx < c["t0"])).all()
    for b in range(c["B"]):
        for h in range(c["Hkv"]):
            k = int(sel[b, h].sum())
            assert ok[b, h, :k].all() and not ok[b, h, k:].any(), "the selected rows come first"
            assert idx[b, h, :k].tolist() == sel[b, h].nonzero().flatten().tolist(), "each in slot order"
            pad = idx[b, h, k:].tolist()                          # then the lowest slots not selected
            assert pad == [t for t in range(c["t0"]) if not sel[b, h, t]][:len(pad)]


# --- Gathers
@pytest.mark.parametrize("gather", GATHERS)
@HYP
@given(c=store_case())
def test_sparse_gather_brings_exactly_the_selected_rows(gather, c):
    store, K, V = filled_store(c, gather=gather)
    B, Hkv, d = c["B"], c["Hkv"], c["d"]
    sel_idx = [to_index(s) for s in c["sels"]]
    handles = [store.fetch(layer, c["t0"], idx, ok) for layer, (idx, ok) in enumerate(sel_idx)]
    for layer, ((idx, ok), h) in enumerate(zip(sel_idx, handles)):   # both in flight, then both taken
        kv, n, ok_out = store.take(h)
        bk, bv = kv.unbind(3)                                                   # (S, B, Hkv, d)
        assert bk.shape == bv.shape == (c["S"], B, Hkv, d) and bk.dtype == c["dtype"]
        assert n == idx.shape[-1] and torch.equal(ok_out, ok)
        gk, gv = rows(bk, n), rows(bv, n)
        for b in range(B):
            for hh in range(Hkv):
                for j in range(n):
                    if ok[b, hh, j]:
                        t = int(idx[b, hh, j])
                        assert torch.equal(gk[j, b, hh], K[layer, b, hh, t]), (layer, b, hh, j, t)
                        assert torch.equal(gv[j, b, hh], V[layer, b, hh, t]), (layer, b, hh, j, t)
        # the same thing, vectorized: the selected (b, h, t) rows, in ascending t per (b, h)
        want = torch.gather(K[layer], 2, idx[..., None].expand(-1, -1, -1, d))          # (B, Hkv, n, d)
        assert torch.equal(gk.permute(1, 2, 0, 3)[ok], want[ok])


@HYP
@given(c=store_case(), data=st.data())
def test_dense_fetch_brings_the_first_t0_tokens(c, data):
    store, K, V = filled_store(c)
    t = data.draw(st.integers(0, c["t0"]), label="t")
    h0, h1 = store.fetch(0, t), store.fetch(1, c["t0"])
    for layer, h, n_want in ((0, h0, t), (1, h1, c["t0"])):
        kv, n, ok = store.take(h)
        bk, bv = kv.unbind(3)
        assert n == n_want and ok is None
        assert torch.equal(bk[:n], K[layer, :, :, :n].permute(2, 0, 1, 3))
        assert torch.equal(bv[:n], V[layer, :, :, :n].permute(2, 0, 1, 3))


@pytest.mark.parametrize("gather", GATHERS)
@HYP
@given(c=store_case())
def test_ledger_counts_bytes(gather, c):
    store, K, V = filled_store(c, n_layers=3, gather=gather)
    elt = torch.tensor([], dtype=c["dtype"]).element_size()
    per_token = c["B"] * c["Hkv"] * c["d"] * elt                        # one token's K (or V) of one layer
    assert store.ledger.d2h == [2 * c["t0"] * per_token] * 3
    assert store.ledger.h2d_per_layer() == [0, 0, 0]
    store.fetch(0, c["t0"])                                             # dense: t0 tokens, K and V
    store.ledger.decoding = True                                        # a decode step: these count per step
    idx, ok = to_index(c["sels"][0])
    store.fetch(1, c["t0"], idx, ok)                                    # sparse: only the wanted rows,
    store.fetch(2, c["t0"], idx, ok)                                    # and their positions when the host
    rows = int(ok.sum())                                                # gathers
    sparse = 2 * rows * c["d"] * elt + (rows * 8 if gather == "host" else 0)
    assert store.ledger.h2d_per_layer() == [2 * c["t0"] * per_token, sparse, sparse]
    assert store.ledger.decode_bytes() == 2 * sparse


@pytest.mark.parametrize("gather", GATHERS)
@HYP
@given(c=store_case())
def test_keys_reads_what_was_appended(gather, c):
    store, K, V = filled_store(c, gather=gather)
    for layer in range(2):
        assert torch.equal(store.keys(layer, c["t0"], CPU), K[layer])


@HYP
@given(shape=st.tuples(*[st.integers(1, 4)] * 4), n=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_kv_rows_puts_a_tokens_k_and_v_side_by_side(shape, n, seed):
    """kv_rows: K, V (B, Hkv, T, d) -> rows (T, B, Hkv, 2, d), new or written in place into a buffer's
    rows n..n+T (what attend does with each layer's new tokens), the buffer's other rows untouched."""
    B, Hkv, T, d = shape
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, B, Hkv, T, d, generator=g)
    r = kv_rows(k, v)
    assert r.shape == (T, B, Hkv, 2, d) and r.is_contiguous()
    assert torch.equal(r[..., 0, :], k.permute(2, 0, 1, 3))
    assert torch.equal(r[..., 1, :], v.permute(2, 0, 1, 3))
    buf = torch.randn(n + T + 2, B, Hkv, 2, d, generator=g)
    before = buf.clone()
    into = kv_rows(k, v, out=buf[n:n + T])
    assert into.data_ptr() == buf[n:n + T].data_ptr() and into.stride() == buf[n:n + T].stride()
    assert torch.equal(buf[n:n + T], r)
    assert torch.equal(buf[:n], before[:n]) and torch.equal(buf[n + T:], before[n + T:])


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@HYP
@given(c=store_case())
def test_host_and_device_gathers_deliver_the_same_rows(c):
    """The readable host path and the kernel fill the buffer identically where ok, and agree on ok."""
    (hs, _, _), (ds, _, _) = filled_store(c, gather="host"), filled_store(c, gather="device")
    for layer, sel in enumerate(c["sels"]):
        idx, ok = to_index(sel)
        (hkv, hn, hok), (dkv, dn, dok) = (s.take(s.fetch(layer, c["t0"], idx, ok)) for s in (hs, ds))
        (hk, hv), (dk, dv) = hkv.unbind(3), dkv.unbind(3)
        assert hn == dn and torch.equal(hok, dok)
        m = hok.permute(2, 0, 1)                                                 # (n, B, Hkv)
        assert torch.equal(hk[:hn][m], dk[:dn][m]) and torch.equal(hv[:hn][m], dv[:dn][m])


def gathered_by_indexing(src, idx, ok, dst):
    """What gather_rows leaves in dst (S', B, Hkv, 2, d): rows src[idx] where ok, dst's own rows elsewhere."""
    B, Hkv, n = idx.shape
    b, h = torch.meshgrid(torch.arange(B), torch.arange(Hkv), indexing="ij")
    got = src[idx, b[..., None], h[..., None]]                                  # (B, Hkv, n, 2, d)
    want = dst.clone()
    want[:n] = torch.where(ok[..., None, None], got, want[:n].permute(1, 2, 0, 3, 4)).permute(2, 0, 1, 3, 4)
    return want


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 4), S=st.integers(1, 40), n=st.integers(0, 40),
       d=st.sampled_from([1, 8, 40, 64, 128]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       programs=st.sampled_from([None, 0, 1, 3]))
def test_gather_kernel_against_indexing(B, Hkv, S, n, d, dtype, seed, programs):
    """kernel.gather_rows on CPU tensors (Triton's interpreter) against plain indexing: rows of any width
    (2d need not be a power of two), rows not wanted left untouched, whatever the grid (a program loops
    over blocks of rows: one program, three, the default, or one per block); it adds the rows it moved to
    a counter."""
    gather_rows = offload.device_kernel("gather_rows")
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(S, B, Hkv, 2, d, generator=g).to(dtype)                   # (S, B, Hkv, 2, d)
    idx = torch.randint(0, S, (B, Hkv, n), generator=g)
    ok = torch.rand(B, Hkv, n, generator=g) < 0.7
    dst = torch.full((n + 1, B, Hkv, 2, d), 7.0, dtype=dtype)
    want = gathered_by_indexing(src, idx, ok, dst)
    count = torch.tensor([5])                                                   # a counter it adds to
    gather_rows(src, idx, ok, dst, count, programs=programs)
    assert torch.equal(dst, want)
    assert count.item() == 5 + ok.sum().item()                                  # the rows it moved


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 4), S=st.integers(1, 40), data=st.data(),
       d=st.sampled_from([1, 8, 40, 64, 128]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_put_kernel_against_indexing(B, Hkv, S, data, d, dtype, seed):
    """kernel.put_rows on CPU tensors (Triton's interpreter) writes each new token's rows into its slot,
    read from a slot tensor, and touches no other slot."""
    put_rows = offload.device_kernel("put_rows")
    at = torch.tensor(data.draw(st.lists(st.integers(0, S - 1), min_size=1, max_size=S, unique=True)))
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(len(at), B, Hkv, 2, d, generator=g).to(dtype)             # (T, B, Hkv, 2, d)
    dst = torch.full((S, B, Hkv, 2, d), 7.0, dtype=dtype)
    put_rows(src, at, dst)
    assert torch.equal(dst, torch.full_like(dst, 7.0).index_copy_(0, at, src))


ON_A_CPU = pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                              reason="needs triton; with a GPU the kernel tests take this path for real")


def pretend_a_gpu(monkeypatch):
    """CUDA "is available" and a tensor's "device copy" is a clone: the tensors copied, in order."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    moved = []
    monkeypatch.setattr(torch.Tensor, "cuda", lambda t: moved.append(t) or t.clone())
    return moved


@ON_A_CPU
def test_cpu_tensors_on_a_machine_with_a_gpu_go_through_device_copies(monkeypatch):
    """Triton's interpreter is one mode per process: where CUDA is, CPU tensors (a --device cpu run, the
    tests) get the compiled kernel on device copies, and only the destination changes. Here the kernel is
    the interpreter's and a "device copy" a clone."""
    cpu = offload.device_kernel("gather_rows")                  # imports kernel as this machine does
    assert offload.device_kernel("gather_rows", cuda=True) is cpu
    moved = pretend_a_gpu(monkeypatch)
    wrapped = offload.device_kernel("gather_rows")
    assert wrapped is not cpu and offload.device_kernel("gather_rows", cuda=True) is cpu
    src = torch.arange(4 * 2 * 3 * 2 * 8, dtype=torch.float32).view(4, 2, 3, 2, 8)    # (S, B, Hkv, 2, d)
    idx, ok = torch.full((2, 3, 1), 2), torch.ones(2, 3, 1, dtype=torch.bool)
    before, dst = src.clone(), torch.zeros(1, 2, 3, 2, 8)
    wrapped(src, idx, ok, dst)
    assert len(moved) == 4 and torch.equal(dst[0], src[2]) and torch.equal(src, before)


@ON_A_CPU
@pytest.mark.parametrize("fused", [False, True])
def test_a_cpu_selection_on_a_machine_with_a_gpu_goes_through_device_copies(fused, monkeypatch):
    """--device cpu --slots kernel|fused where CUDA is: the selection kernel gets device copies of the CPU
    scores and its slots come back to the CPU (handed to it as they were, the compiled kernel would read a
    host pointer as a device one). Scores from one head, or a KV head's two query heads' partial ones."""
    import skew as SK
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 2, 40, generator=g) if fused else torch.randn(2, 3, 40, generator=g)
    s[0, ..., 30:] = float("-inf")                                       # a shorter sequence
    k = torch.tensor([5, 12])
    want = SK.top_slots(s, k, 12)                                        # torch's operations
    monkeypatch.setattr(SK, "SLOTS", "fused" if fused else "kernel")
    moved = pretend_a_gpu(monkeypatch)
    idx, ok = SK.top_slots(s, k, 12)
    assert len(moved) == 2 and not idx.is_cuda and torch.equal(idx, want[0]) and torch.equal(ok, want[1])


@ON_A_CPU
def test_a_cpu_speculation_on_a_machine_with_a_gpu_goes_through_device_copies(monkeypatch):
    """The same for the partial score kernel (--slots fused): a CPU token's partial scores come from device
    copies and back to the CPU, equal to the kernel's on the CPU tensors (an OPT layer: no RoPE)."""
    import skew as SK
    g = torch.Generator().manual_seed(4)
    C, H, Hkv, m, t = 16, 4, 2, 4, 20
    Wp = (torch.randn(H * m, C, generator=g), torch.randn(H * m, generator=g), torch.randint(0, 8, (H, m)))
    x, kpart = torch.randn(1, 1, C, generator=g), torch.randn(1, Hkv, t + 3, m, generator=g)[:, :, :t]
    allowed = torch.rand(1, 1, t, generator=g) < 0.7
    monkeypatch.setattr(SK, "SLOTS", "fused")
    want = SK.speculate_ahead(x, None, None, None, Wp, kpart, 0.5, allowed)          # (1, Hkv, G, t)
    moved = pretend_a_gpu(monkeypatch)
    z = SK.speculate_ahead(x, None, None, None, Wp, kpart, 0.5, allowed)
    assert len(moved) == 4 and not z.is_cuda and z.shape == (1, Hkv, H // Hkv, t) and torch.equal(z, want)


def nvidia_compiler():  # Triton's CUDA compiler (ptxas ships in the wheel): it needs no GPU
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except ImportError:
        return False


COMPILE = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernel
out = {}
for key, name, sig, const, aligned, warps in json.loads(sys.stdin.read()):
    src = ASTSource(fn=getattr(kernel, name), signature=sig, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    try:
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        out[key] = sorted(set(re.findall(r"(?:ld|st)[.]global[.\\w]*", ptx)))
    except Exception as e:
        out[key] = "error: " + repr(e)[-3000:]
print(json.dumps(out))
"""
MOVES = {"gather_rows_kernel": ["src", "idx", "ok", "dst", "count", "n", "BH"],
         "put_rows_kernel": ["src", "at", "dst", "T", "BH"]}
SELECT = ["s", "k", "idx", "ok", "w", "n", "Hkv", "alpha"]
SCORES = ["qp", "cols", "cs", "kp", "allowed", "z", "B", "Hkv", "D", "w", "k_row", "a_b", "a_h", "scale"]


@pytest.fixture(scope="module")
def hopper_ptx():
    """Every kernel of kernel.py compiled for an H100/H200 (sm_90), no GPU needed, in one process of its own:
    Triton takes one mode per process, and this one's is the interpreter (offload sets it on a machine
    without a GPU). -> {case: the PTX's global load and store instructions, or "error: ..."}."""
    import json
    import subprocess
    import sys
    cases = []
    for name, args in MOVES.items():             # as Triton's launcher specializes 16-byte aligned tensors
        for dtype in ("fp16", "bf16", "fp32"):
            for d in (48, 64, 128):
                types = {"src": f"*{dtype}", "dst": f"*{dtype}", "idx": "*i64", "at": "*i64", "ok": "*i1"}
                const = {"R": 2 * d, "RP": 1 << (2 * d - 1).bit_length(), "BLOCK": 32}
                const |= {"STEPS": 4} if name == "gather_rows_kernel" else {}     # the gather loops: blocks
                sig = {a: types.get(a, "i32") for a in args} | dict.fromkeys(const, "constexpr")
                sig |= {"count": "*i64"} if "count" in args else {}       # one counter of the ledger's
                cases.append([f"{name} {dtype} {d}", name, sig, const,
                              [i for i, a in enumerate(args) if a in types], 4])
    types = {"s": "*fp32", "k": "*i64", "idx": "*i64", "ok": "*i1", "alpha": "fp32"}
    for finite in (False, True):
        for W, warps, G in ((1024, 4, 0), (4096, 8, 0), (16384, 16, 0), (4096, 8, 3)):
            const = {"FINITE": finite, "W": W, "G": G}
            sig = {a: types.get(a, "i32") for a in SELECT} | dict.fromkeys(const, "constexpr")
            cases.append([f"top_slots_kernel {finite} {W} {G}", "top_slots_kernel", sig, const,
                          [0, 1, 2, 3, 4], warps])                  # w (the slots, 4096) a multiple of 16 too
    for dtype in ("fp16", "bf16", "fp32"):      # the speculation kernel at SmolLM2's and Llama-2-7B's shapes
        types = {"qp": f"*{dtype}", "cs": f"*{dtype}", "kp": f"*{dtype}", "cols": "*i64", "allowed": "*i1",
                 "z": "*fp32", "scale": "fp32"}
        for G, m in ((3, 32), (1, 64)):
            const = {"G": G, "GP": 1 << (G - 1).bit_length(), "M": m, "MP": m, "TB": 64, "ROPE": True}
            sig = {a: types.get(a, "i32") for a in SCORES} | dict.fromkeys(const, "constexpr")
            cases.append([f"partial_scores_kernel {dtype} {G}", "partial_scores_kernel", sig, const,
                          [i for i, a in enumerate(SCORES) if types.get(a, "").startswith("*")], 4])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(cases), capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.skipif(not (HAS_TRITON and nvidia_compiler()), reason="needs triton with its CUDA compiler")
@pytest.mark.parametrize("name", ["gather_rows_kernel", "put_rows_kernel"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [48, 64, 128])
def test_kernels_compile_for_hopper_with_16_byte_rows(hopper_ptx, name, dtype, d):
    """Both kernels compile for an H100/H200 (sm_90) here, without a GPU, with the arguments specialized
    as Triton's launcher does for 16-byte aligned tensors: every K, V row is read and written in 16-byte
    vector loads and stores (over PCIe, for the pinned store), never element by element."""
    ops = hopper_ptx[f"{name} {dtype} {d}"]
    assert not isinstance(ops, str), ops
    assert {"ld.global.v4.b32", "st.global.v4.b32"} <= set(ops), ops
    assert not {"ld.global.b16", "st.global.b16", "ld.global.b32", "st.global.b32"} & set(ops), ops


@pytest.mark.skipif(not (HAS_TRITON and nvidia_compiler()), reason="needs triton with its CUDA compiler")
@pytest.mark.parametrize("finite", [False, True])
@pytest.mark.parametrize("W", [1024, 4096, 16384])
def test_the_selection_kernel_compiles_for_hopper(hopper_ptx, finite, W):
    """The selection kernel (skew.SLOTS = "kernel") compiles for sm_90 too, at every row width the engine
    launches it with (the interpreter checks its logic, not its types), and reads its scores in 16-byte
    loads where a row's length is a multiple of 16 (Triton's launcher specializes it then)."""
    ops = hopper_ptx[f"top_slots_kernel {finite} {W} 0"]
    assert not isinstance(ops, str), ops
    assert "ld.global.v4.b32" in ops, ops
    ops = hopper_ptx[f"top_slots_kernel {finite} 4096 3"]            # the heads' partial scores (SLOTS fused)
    assert not isinstance(ops, str), ops


@pytest.mark.skipif(not (HAS_TRITON and nvidia_compiler()), reason="needs triton with its CUDA compiler")
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("G", [3, 1])
def test_the_speculation_kernel_compiles_for_hopper(hopper_ptx, dtype, G):
    """The partial score kernel (skew.SLOTS = "fused") compiles for sm_90 in every model dtype, at SmolLM2's
    shape (G = 3, m = 32) and Llama-2-7B's (G = 1, m = 64)."""
    ops = hopper_ptx[f"partial_scores_kernel {dtype} {G}"]
    assert not isinstance(ops, str), ops
    assert any(op.startswith("st.global") for op in ops), ops


def test_host_tensor_is_plain_on_a_cpu():
    t = offload.host_tensor((3, 5), torch.float16, pin=False)
    assert t.shape == (3, 5) and t.dtype == torch.float16 and not t.is_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_tensor_is_pinned_at_its_size():
    """Registered, not taken from torch's pinned pool (which would round 3 MiB + 2 bytes up to 4 MiB)."""
    def pool():  # every byte count of torch's pinned pool, whatever a torch version names them
        stats = torch.cuda.host_memory_stats()
        return {k: v for k, v in stats.items() if "bytes" in k and k.endswith(".current")}

    torch.cuda.init()                         # its stats are {} until CUDA is initialised (a test run alone)
    n = 3 * 2**20 + 2
    before = pool()
    control = torch.empty(n, dtype=torch.uint8, pin_memory=True)     # the pool's way: it shows in the stats
    assert control.is_pinned() and any(v >= before.get(k, 0) + n for k, v in pool().items()), pool()
    before = pool()
    t = offload.host_tensor((n,), torch.uint8, pin=True)
    assert t.is_pinned()
    assert pool() == before
    x = torch.arange(t.numel(), dtype=torch.uint8)
    t.copy_(x)
    assert torch.equal(t.to("cuda", non_blocking=True).cpu(), x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_copy_streams_are_never_the_graphs_capture_stream():
    """torch hands out its 32 default-priority streams in turn, and records CUDA graphs on one of them: a
    copy stream drawn from that pool would, every 32 stores, be the capture stream itself (copy and compute
    in one stream, no overlap). The copy streams have high priority: another pool."""
    capture = torch.cuda.graph(torch.cuda.CUDAGraph()).capture_stream     # the one every graph records on
    streams = [KVStore(1, 1, 4, 1, 8, torch.device("cuda"), torch.float16).stream for _ in range(70)]
    assert all(s.priority < capture.priority and s != capture for s in streams)


class FakeCudart:   # the two calls of torch.cuda.cudart() that host_tensor and unpin make, logged
    def __init__(self):
        self.calls = []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr))
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def test_pinned_memory_is_unregistered_when_freed_even_while_a_graph_records(monkeypatch):
    """Freed, a block is unregistered after a sync that a test forbidding syncs does not trip; freed while
    a CUDA graph records (no sync allowed), it stays registered until the next block is pinned."""
    fake, modes, capturing = FakeCudart(), [], [False]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 2)               # "error"
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: fake.calls.append(("sync", modes[-1])))
    t = offload.host_tensor((1024,), torch.float16, pin=True)
    ptr = t.data_ptr()
    del t
    assert fake.calls == [("register", ptr), ("sync", 0), ("unregister", ptr)] and modes == [0, 2]
    fake.calls.clear()
    capturing[0] = True
    t = offload.host_tensor((1024,), torch.float16, pin=True)
    ptr = t.data_ptr()
    del t
    capturing[0] = False
    assert fake.calls == [("register", ptr)] and offload.LATE == [ptr]
    t = offload.host_tensor((8,), torch.float16, pin=True)
    assert fake.calls[1:] == [("sync", 0), ("unregister", ptr), ("register", t.data_ptr())]
    assert not offload.LATE
    del t                                                          # while the fakes stand


def test_a_failed_pin_is_one_line_and_leaves_no_error_behind(monkeypatch):
    """cudaHostRegister's error stays in CUDA's last-error slot, where torch's check after the next kernel
    launch would find it and blame that kernel: host_tensor launches one itself and drops what it finds."""
    fake, launched = FakeCudart(), []
    fake.cudaHostRegister = lambda ptr, size, flags: 2                      # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)

    def zeros(*shape, device=None):
        launched.append(device)
        raise RuntimeError("CUDA error: out of memory")                    # the error found, and dropped
    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(OffloadError, match=r"cannot pin 2\.00 MiB of host .* \(cudaHostRegister error 2\)"):
        offload.host_tensor((2**20,), torch.float16, pin=True)
    assert launched == ["cuda"]


def test_a_failed_unpin_leaves_no_error_behind(monkeypatch):
    """cudaHostUnregister's error (a block no longer registered ...) would be found by torch after the
    next kernel launch and blamed on that kernel: unpin launches one itself, drops what it finds."""
    fake, launched = FakeCudart(), []
    fake.cudaHostUnregister = lambda ptr: 713                          # cudaErrorHostMemoryNotRegistered
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    for name, fn in [("is_current_stream_capturing", lambda: False), ("get_sync_debug_mode", lambda: 0),
                     ("set_sync_debug_mode", lambda mode: None), ("synchronize", lambda *a: None)]:
        monkeypatch.setattr(torch.cuda, name, fn)

    def zeros(*shape, device=None):
        launched.append(device)
        raise RuntimeError("CUDA error: part or all of the requested memory range is not registered")
    monkeypatch.setattr(torch, "zeros", zeros)
    offload.unpin(1234)
    assert launched == ["cuda"]
    fake.cudaHostUnregister = lambda ptr: 0
    offload.unpin(1234)
    assert launched == ["cuda"]                                        # no error: no launch


def test_the_host_memory_to_plan_with_can_be_given(monkeypatch):
    """A virtual machine that grows its memory as it is used reports too little: INFINIGEN_HOST_GIB."""
    monkeypatch.setenv("INFINIGEN_HOST_GIB", "2")
    assert offload.host_available() == 2 * 2**30
    with pytest.raises(OffloadError, match=r"needs 2\.00 GiB but only 2\.00 GiB"):
        offload.preflight(2 * 2**30, 0, CPU)
    offload.preflight(2**30, 0, CPU)
    for bad in ("lots", "nan", "inf", "0", "-1", " "):
        monkeypatch.setenv("INFINIGEN_HOST_GIB", bad)
        with pytest.raises(ValueError, match=f"INFINIGEN_HOST_GIB={bad!r} is not a positive number of GiB"):
            offload.host_available()
    monkeypatch.setenv("INFINIGEN_HOST_GIB", "1.5e1")
    assert offload.host_available() == 15 * 2**30


# --- The bounded pool
def check_consistent(pool, L, B):
    for layer in range(L):
        for b in range(B):
            where, owner = pool.where[layer, b], pool.owner[layer, b]
            resident = (where >= 0).nonzero().flatten().tolist()
            assert len(resident) <= pool.cap, f"{len(resident)} tokens resident > capacity {pool.cap}"
            for t in resident:
                assert int(owner[int(where[t])]) == t
            for p, t in enumerate(owner.tolist()):
                if t >= 0:
                    assert int(where[t]) == p
            assert len(resident) == int((owner >= 0).sum())


def admit_one(pool, layer, b, t):
    """Token t of sequence b alone (the other sequences' rows are pads): its slot."""
    valid = torch.zeros(pool.where.shape[1], 1, dtype=torch.bool)
    valid[b] = True
    return int(pool.admit(layer, t, valid)[b, 0])


class SequentialPool(Pool):
    """The pool as it was written first: one token of one sequence at a time, in plain Python (the
    reference the batched `admit` must equal, eviction for eviction)."""
    def admit(self, layer, t0, valid=None):
        valid = torch.ones(self.where.shape[1], 1, dtype=torch.bool) if valid is None else valid
        for j in range(valid.shape[1]):
            for b in range(valid.shape[0]):
                if valid[b, j]:
                    self.admit_token(layer, b, t0 + j)
        return torch.where(valid, self.where[layer, :, t0:t0 + valid.shape[1]], -1)

    def admit_token(self, layer, b, t):
        free = (self.owner[layer, b] < 0).nonzero()
        if len(free):
            p = int(free[0])
        else:
            res = self.owner[layer, b]                                  # (P,) tokens resident
            if self.policy == "fifo":
                victim = int(res.min())
            elif self.policy == "lru":      # ties: the oldest token
                use = self.last_use[layer, b, res]
                victim = int(res[use == use.min()].min())
            else:  # counter: among the older half of the residents, the least often fetched (then oldest)
                old = res[res <= res.median()]
                n = self.fetches[layer, b, old]
                victim = int(old[n == n.min()].min())
            p = int((res == victim).nonzero()[0])
            self.where[layer, b, victim] = -1
        self.owner[layer, b, p], self.where[layer, b, t] = t, p
        self.last_use[layer, b, t] = self.clock


@st.composite
def chunked_pool_ops(draw):
    """Prefill-like chunks (left padding: each sequence's first tokens may be pads) and touches."""
    B, S = draw(st.integers(1, 3)), draw(st.integers(2, 24))
    policy = draw(st.sampled_from(["fifo", "lru", "counter"]))
    cap = draw(st.integers(1, S))
    start = [draw(st.integers(0, S // 2)) for _ in range(B)]            # first real token of each sequence
    ops, t = [], 0
    while t < S:
        T = draw(st.integers(1, S - t))
        ops.append(("admit", t, torch.tensor([[t + j >= s for j in range(T)] for s in start])))
        t += T
        n = draw(st.integers(0, t))
        if n:
            idx = torch.tensor(draw(st.lists(st.integers(0, t - 1), min_size=B * n, max_size=B * n)))
            ops.append(("touch", idx.view(B, 1, n), torch.tensor(start).view(B, 1, 1) <= idx.view(B, 1, n)))
    return dict(B=B, S=S, cap=cap, policy=policy, ops=ops)


@HYP
@given(c=chunked_pool_ops())
def test_pool_batched_admit_equals_one_at_a_time(c):
    """Whole chunks of the batch at once make the same evictions as admitting one token of one sequence
    at a time: the same slots, owners, clocks and misses; pads take no slot."""
    pools = [cls(1, c["B"], c["S"], c["cap"], c["policy"]) for cls in (Pool, SequentialPool)]
    for op, a, b in c["ops"]:
        if op == "admit":
            got, want = (pool.admit(0, a, b) for pool in pools)
            assert torch.equal(got, want)
            assert (got[~b] == -1).all()
            for row in got:      # a token evicted within the call has no slot: no slot is written twice
                assert len(row[row >= 0].unique()) == int((row >= 0).sum())
        else:
            assert torch.equal(*(pool.touch(0, a, b) for pool in pools))
        for name in ("where", "owner", "last_use", "fetches"):
            assert torch.equal(getattr(pools[0], name), getattr(pools[1], name)), name
        assert (pools[0].misses, pools[0].requests) == (pools[1].misses, pools[1].requests)
    check_consistent(pools[0], 1, c["B"])


@st.composite
def pool_ops(draw):
    L, B, S = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(2, 12))
    policy = draw(st.sampled_from(["fifo", "lru", "counter"]))
    Hkv = draw(st.integers(1, 3))
    cap = draw(st.one_of(st.integers(1, 3), st.integers(1, S + 2)))     # small pools evict often
    ops = []
    for _ in range(draw(st.integers(1, 40))):
        if draw(st.sampled_from([True, True, False])):
            ops.append(("admit", draw(st.integers(0, L - 1)), draw(st.integers(0, B - 1))))
        else:
            sel = draw(st.lists(st.booleans(), min_size=B * Hkv * S, max_size=B * Hkv * S))
            ops.append(("touch", draw(st.integers(0, L - 1)), torch.tensor(sel).view(B, Hkv, S)))
    return dict(L=L, B=B, S=S, Hkv=Hkv, cap=cap, policy=policy, ops=ops)


@HYP
@given(c=pool_ops())
def test_pool_capacity_and_eviction(c):
    """Random admits (each sequence's tokens in order, as the store appends them) and touches, checked
    against a model of the pool: residency, capacity, hits and misses, and the victim of each eviction."""
    L, B, S, cap, policy = c["L"], c["B"], c["S"], c["cap"], c["policy"]
    pool = Pool(L, B, S, cap, policy)
    nxt = [[0] * B for _ in range(L)]
    resident = [[set() for _ in range(B)] for _ in range(L)]
    fetches = [[[0] * S for _ in range(B)] for _ in range(L)]
    last = [[[0] * S for _ in range(B)] for _ in range(L)]
    clock = misses = requests = 0
    evicted = 0
    for op, layer, arg in c["ops"]:
        if op == "admit":
            b, t = arg, nxt[layer][arg]
            if t >= S:
                continue
            nxt[layer][b] += 1
            res = resident[layer][b]
            before = set(res)
            p = admit_one(pool, layer, b, t)
            last[layer][b][t] = clock                       # being admitted counts as a use
            after = set((pool.where[layer, b] >= 0).nonzero().flatten().tolist())
            assert 0 <= p < cap and int(pool.where[layer, b, t]) == p
            if len(before) < cap:
                assert after == before | {t}, "evicted although the pool had room"
            else:
                gone = before - after
                assert len(gone) == 1 and after == (before - gone) | {t}
                v = gone.pop()
                evicted += 1
                if policy == "fifo":
                    assert v == min(before), f"fifo evicted {v}, oldest is {min(before)}"
                elif policy == "lru":
                    low = min(last[layer][b][r] for r in before)
                    assert v == min(r for r in before if last[layer][b][r] == low), f"lru evicted {v}"
                else:
                    srt = sorted(before)
                    older = [r for r in srt if r <= srt[(len(srt) - 1) // 2]]
                    assert v in older, f"counter evicted {v}, not in the older half {older}"
                    low = min(fetches[layer][b][r] for r in older)
                    assert v == min(r for r in older if fetches[layer][b][r] == low), f"counter evicted {v}"
            resident[layer][b] = after
        else:
            idx, ok = to_index(arg)
            clock += 1
            slots = pool.touch(layer, idx, ok)
            for b in range(B):
                for h in range(c["Hkv"]):
                    for j in range(idx.shape[-1]):
                        t, o = int(idx[b, h, j]), bool(ok[b, h, j])
                        hit = o and t in resident[layer][b]
                        want = int(pool.where[layer, b, t]) if hit else -1
                        assert int(slots[b, h, j]) == want, (b, h, j, t)
                        requests += o
                        misses += o and not hit
                        if hit:
                            fetches[layer][b][t] += 1
                            last[layer][b][t] = clock
            assert (pool.misses, pool.requests) == (misses, requests)
        check_consistent(pool, L, B)
    if cap >= S:
        assert evicted == 0


@HYP
@given(L=st.integers(1, 2), B=st.integers(1, 3), Hkv=st.integers(1, 3), S=st.integers(1, 10),
       extra=st.integers(0, 3), policy=st.sampled_from(["fifo", "lru", "counter"]), data=st.data())
def test_pool_large_enough_never_misses(L, B, Hkv, S, extra, policy, data):
    pool = Pool(L, B, S, S + extra, policy)
    for t in range(S):
        for layer in range(L):
            for b in range(B):
                admit_one(pool, layer, b, t)
    assert (pool.where >= 0).all(), "a token was evicted from a pool with room for all"
    asked = 0
    for _ in range(data.draw(st.integers(1, 4), label="touches")):
        n = L * B * Hkv * S
        sel = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        for layer, s in enumerate(sel.view(L, B, Hkv, S)):
            idx, ok = to_index(s)
            slots = pool.touch(layer, idx, ok)
            assert torch.equal(slots >= 0, ok)
            asked += int(ok.sum())
    assert pool.misses == 0 and pool.requests == asked
    check_consistent(pool, L, B)


def one_head_touch(pool, tokens):
    """Fetch `tokens` of sequence 0 of layer 0, one KV head."""
    return pool.touch(0, torch.tensor([[tokens]]), torch.ones(1, 1, len(tokens), dtype=torch.bool))


@pytest.mark.parametrize("policy,touches,victim", [
    ("fifo", [[0, 1], [0]], 0),            # the oldest, however often fetched
    ("lru", [[0, 1], [2, 3], [0]], 1),     # fetched longest ago
    ("lru", [[1, 2, 3]], 0),               # never fetched
    ("counter", [[0, 2], [0], [3]], 1),    # fewest fetches among the older half {0, 1}
    ("counter", [[1], [1, 2]], 0),
])
def test_pool_victims(policy, touches, victim):
    pool = Pool(1, 1, 8, 4, policy)
    for t in range(4):
        assert admit_one(pool, 0, 0, t) == t           # free slots are used in order
    for tokens in touches:
        assert (one_head_touch(pool, tokens) >= 0).all()
    p = admit_one(pool, 0, 0, 4)
    assert int(pool.where[0, 0, victim]) == -1, f"{policy} should evict token {victim}"
    assert p == victim and int(pool.where[0, 0, 4]) == p
    assert int((pool.where[0, 0] >= 0).sum()) == 4
    assert pool.misses == 0 and pool.requests == sum(map(len, touches))
    assert int(one_head_touch(pool, [victim])[0, 0, 0]) == -1 and pool.misses == 1


@pytest.mark.parametrize("policy", ["lru", "counter"])
def test_pool_ties_evict_the_oldest_token(policy):
    """A layer that fetches every resident token each step stamps them all alike. The tie goes to the
    oldest token, not to the lowest slot, which after one eviction holds the newest token: lowest-slot
    LRU evicted the token admitted one step before, every step, and lost the recent window."""
    pool = Pool(1, 1, 16, 4, policy)
    for t in range(10):
        admit_one(pool, 0, 0, t)
        resident = pool.owner[0, 0][pool.owner[0, 0] >= 0].tolist()
        one_head_touch(pool, resident)                  # a dense step: every resident token fetched
    kept = sorted(pool.owner[0, 0].tolist())
    assert kept == {"lru": [6, 7, 8, 9], "counter": [0, 7, 8, 9]}[policy], f"{policy} kept {kept}"


def test_pool_lru_over_several_kv_heads():
    pool = Pool(1, 1, 8, 3, "lru")
    for t in range(3):
        admit_one(pool, 0, 0, t)
    pool.touch(0, torch.tensor([[[1], [2]]]), torch.tensor([[[True], [True]]]))    # tokens 1, 2 at time 1
    pool.touch(0, torch.tensor([[[0], [0]]]), torch.tensor([[[True], [False]]]))  # token 0 at time 2, head 0
    assert int(pool.last_use[0, 0, 0]) == pool.clock
    admit_one(pool, 0, 0, 3)
    assert int(pool.where[0, 0, 0]) >= 0, "lru evicted the most recently fetched token"


@HYP
@given(c=store_case(pooled=True))
def test_gather_through_a_pool(c):
    """With a bounded pool in the store: resident tokens come back right, evicted ones are reported
    missing."""
    pool = Pool(2, c["B"], c["S"], c["cap"], c["policy"])
    store, K, V = filled_store(c, pool=pool)
    for layer in range(2):
        idx, ok = to_index(c["sels"][layer])
        kv, n, ok_out = store.take(store.fetch(layer, c["t0"], idx, ok))
        bk, bv = kv.unbind(3)
        resident = torch.gather(pool.where[layer], 1, idx.reshape(c["B"], -1)).view_as(idx) >= 0
        assert torch.equal(ok_out, ok & resident)
        if c["cap"] >= c["t0"]:
            assert torch.equal(ok_out, ok), "a pool holding every token missed"
        want_k = torch.gather(K[layer], 2, idx[..., None].expand(-1, -1, -1, c["d"]))
        want_v = torch.gather(V[layer], 2, idx[..., None].expand(-1, -1, -1, c["d"]))
        assert torch.equal(bk[:n].permute(1, 2, 0, 3)[ok_out], want_k[ok_out])
        assert torch.equal(bv[:n].permute(1, 2, 0, 3)[ok_out], want_v[ok_out])
    check_consistent(pool, 2, c["B"])


# --- Memory preflight
def test_preflight_refuses_absurd_host_memory():
    if offload.host_available() is None:
        pytest.skip("no /proc/meminfo on this machine")
    with pytest.raises(OffloadError, match=r"CPU KV store needs 931322\.57 GiB but only [\d.]+ GiB"):
        offload.preflight(10**15, 0, CPU)
    offload.preflight(2**20, 0, CPU)   # a MiB is fine


def test_preflight_on_a_cpu_counts_the_device_bytes_as_host_bytes(monkeypatch):
    """On a CPU the "device" buffers (and the full policy's whole cache) are host memory too."""
    monkeypatch.setenv("INFINIGEN_HOST_GIB", "1")
    offload.preflight(2**28, 2**28, CPU)
    with pytest.raises(OffloadError, match=r"needs 1\.00 GiB but only 1\.00 GiB"):
        offload.preflight(2**29, 2**29, CPU)
    import infinigen as I
    import model as M
    m = M.Transformer(M.Config("llama", vocab_size=10, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=8,
                               max_seq_len=2**10))
    with pytest.raises(OffloadError, match=r"needs 128\.00 GiB"):       # K, V x L 2 x B 2^20 x S 2^10 x d 8
        I.make_cache(m, I.Policy("full"), 2**20, 2**10)


def test_store_preflights_before_allocating():
    if offload.host_available() is None:
        pytest.skip("no /proc/meminfo on this machine")
    L, B, S, Hkv, d = 10_000, 1_000, 10_000, 32, 128                     # ~1.6e15 bytes at fp16
    row = 2 * d * 2                                                      # a token's K and V of one head
    rows, staging = S * B * Hkv, 2 * S * B * Hkv * (row + 8)          # staging: rows and positions, twice
    need = L * rows * row + staging + (2 * rows * row + staging)       # store; on a CPU the device's too
    with pytest.raises(OffloadError, match=f"needs {need / 2**30:.2f} GiB"):
        KVStore(L, B, S, Hkv, d, CPU, torch.float16)
    dense = 2 * rows * row                                               # layers 0 and 1 stay off the store
    with pytest.raises(OffloadError, match=f"needs {(need - dense) / 2**30:.2f} GiB"):
        KVStore(L, B, S, Hkv, d, CPU, torch.float16, first=2)


def test_a_pool_store_holds_its_capacity_not_the_context():
    """The store of a bounded pool has `capacity` slots per layer and sequence (the point of a pool)."""
    store = KVStore(4, 2, 100, 2, 8, CPU, torch.float32, pool=Pool(3, 2, 100, 8), first=1)
    assert store.kv.shape == (3, 8, 2, 2, 2, 8)                            # (L - first, P, B, Hkv, 2, d)
    assert store.buf[0].shape[0] == 100                                   # a fetch may bring any slot


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_preflight_refuses_absurd_device_memory():
    msg = r"device KV buffers need 931322\.57 GiB but only [\d.]+ GiB is free"
    with pytest.raises(OffloadError, match=msg):
        offload.preflight(0, 10**15, torch.device("cuda"))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_take_strided_index_views():
    """idx, ok (gather) and at (put) may be views with strides (a transpose, a column): each wrapper makes
    them contiguous before the kernel reads them as flat arrays."""
    gather_rows, put_rows = offload.device_kernel("gather_rows"), offload.device_kernel("put_rows")
    g = torch.Generator().manual_seed(0)
    B, Hkv, S, n, d = 2, 3, 9, 5, 8
    src = torch.randn(S, B, Hkv, 2, d, generator=g)
    idx = torch.randint(0, S, (n, Hkv, B), generator=g).permute(2, 1, 0)        # (B, Hkv, n), strided
    ok = (torch.rand(n, B, Hkv, generator=g) < 0.7).permute(1, 2, 0)            # (B, Hkv, n), strided
    dst = torch.zeros(n, B, Hkv, 2, d)
    want = gathered_by_indexing(src, idx, ok, dst)
    gather_rows(src, idx, ok, dst)
    assert torch.equal(dst, want)
    at = torch.tensor([[4, 0], [1, 0], [7, 0]])[:, 0]                            # a column: stride 2
    new, store = torch.randn(3, B, Hkv, 2, d, generator=g), torch.zeros(S, B, Hkv, 2, d)
    put_rows(new, at, store)
    assert torch.equal(store, torch.zeros_like(store).index_copy_(0, at, new))
