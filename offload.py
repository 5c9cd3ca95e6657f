"""The CPU side of the KV cache: the store, the device buffers and the two ways rows reach them, the
copy stream, the ledger, the pool.

Layout of the store: one block `kv` (L, S, B, Hkv, 2, d), token-major, with a token's key and value
side by side in one row of 2d numbers. The first t tokens of a layer are one contiguous block (one
DMA for a dense fetch), and the rows a selection needs are found by one flat index:
row = slot * B * Hkv + b * Hkv + h. A sparse fetch brings them in one of two ways:
  host    the reference: the indices come to the host, the CPU gathers the rows into a pinned
          staging buffer, one copy sends them, and `index_copy_` puts them in place on the device.
  device  a kernel (kernel.py) reads the rows straight from pinned memory into place; the indices
          never leave the device and the host waits for nothing. The default on CUDA.
On a machine without CUDA the "device" is the CPU, the stream is None, and the same gathers run as
plain copies (the kernel under Triton's interpreter), so the tests exercise this very code.
"""
import contextlib
import os
import time
import weakref

import torch

if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):   # no GPU: Triton's kernels
    os.environ["TRITON_INTERPRET"] = "1"    # run in its interpreter, set before torch imports triton itself
GATHERS = ("auto", "host", "device")


class OffloadError(Exception):
    """A user-facing problem (memory, capacity): printed as one line."""


class GraphError(RuntimeError):
    """A decode step CUDA could not record as a graph (infinigen.Graphed): a bug, printed as one line."""


# --- Memory preflight
def host_available():
    """Bytes of CPU memory the OS says it can still give; INFINIGEN_HOST_GIB overrides it, for a virtual
    machine whose memory grows as it is used (it reports far less than it can give)."""
    over = os.environ.get("INFINIGEN_HOST_GIB")
    if over:
        try:
            gib = float(over)
        except ValueError:
            gib = -1.0
        if not 0 < gib < float("inf"):                                            # nan fails too
            raise ValueError(f"INFINIGEN_HOST_GIB={over!r} is not a positive number of GiB")
        return gib * 2**30
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def gib(n):  # bytes, as people read them
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def preflight(host_bytes, device_bytes, device, what="KV"):
    """Refuse, naming the sizes, when host or device memory cannot hold what is about to be allocated."""
    host_bytes += device_bytes if device.type == "cpu" else 0          # a CPU's device memory is host memory
    avail = host_available()
    if avail is not None and host_bytes > 0.9 * avail:
        raise OffloadError(f"CPU {what} store needs {gib(host_bytes)} but only {gib(avail)} "
                           "of host memory is available")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if device_bytes > 0.9 * free:
            raise OffloadError(f"device {what} buffers need {gib(device_bytes)} but only {gib(free)} "
                               f"is free on {device}")


def host_tensor(shape, dtype, pin):
    """A host tensor, page-locked when `pin` (CUDA): registered at exactly its size, where torch's
    pinned allocator would round the block up to a power of two (an 8.7 GB store would take 16 GiB).
    Registered memory is mapped, so a kernel can read it through its host pointer."""
    t = torch.empty(shape, dtype=dtype)
    if pin and t.numel():
        while LATE:
            unpin(LATE.pop())
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 3)   # portable | mapped
        if int(err) != 0:
            drop_cuda_error()
            raise OffloadError(f"cannot pin {gib(t.numel() * t.element_size())} of host memory "
                               f"(cudaHostRegister error {int(err)})")
        weakref.finalize(t, unpin, t.data_ptr())
    return t


def drop_cuda_error():  # a failed cudart call leaves its error for the next launch's check to find (and
    with contextlib.suppress(RuntimeError):     # blame on another kernel, another row): found here instead
        torch.zeros(1, device="cuda").add_(1)


LATE = []   # blocks freed while a CUDA graph was being recorded (it may not sync): unpinned at the next pin


def unpin(ptr):  # before the memory goes back: nothing queued may still read it
    try:
        if torch.cuda.is_current_stream_capturing():
            LATE.append(ptr)                 # still registered: a reuse of its pages is harmless
            return
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)   # a wanted sync, also inside a test that forbids them
        try:
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
            drop_cuda_error()
    except RuntimeError:                     # CUDA already shut down at exit
        pass


# --- Gathers
def gather_mode(gather, device):
    """auto: the device gather on CUDA (when Triton is there), the host gather on a CPU."""
    if gather not in GATHERS:
        raise ValueError(f"unknown gather {gather!r} (choose from {', '.join(GATHERS)})")
    if gather == "auto":
        return "device" if device.type == "cuda" and triton_available() else "host"
    if gather == "device" and not triton_available():
        raise ValueError("--gather device needs the triton package (pip install triton)")
    return gather


def triton_available():
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def device_kernel(name, cuda=False):
    """A kernel of kernel.py, imported on first use. Without a GPU its logic runs under Triton's interpreter
    (CI; TRITON_INTERPRET is set above). Triton takes one mode per process, so with a GPU, CPU tensors (cuda
    False) go through the compiled kernel on device copies, and what it changed or returned comes back."""
    gpu = torch.cuda.is_available()
    import kernel
    if not gpu and not kernel.triton.knobs.runtime.interpret:
        raise OffloadError("without a GPU the gather kernel runs under Triton's interpreter, which "
                           f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']!r} switches off (set it to 1)")
    fn = getattr(kernel, name)
    if cuda or not gpu:
        return fn

    def on_copies(*args, **kw):             # the arguments it wrote (dst, a count), or its results (idx, ok)
        dev = [a.cuda() if torch.is_tensor(a) else a for a in args]
        out = fn(*dev, **kw)
        for a, d in zip(args, dev):
            if torch.is_tensor(a) and not torch.equal(a, d.cpu()):
                a.copy_(d)
        return out if out is None else out.cpu() if torch.is_tensor(out) else tuple(t.cpu() for t in out)
    return on_copies


# --- Ledger
class Ledger:
    """Bytes copied host->device and device->host, per layer, in all and in decode steps. Bytes the
    host knows are plain ints; rows a device gather moved are counted on the device (no sync)."""
    def __init__(self, n_layers, device, row_bytes):
        self.h2d, self.d2h = [0] * n_layers, [0] * n_layers
        self.rows = torch.zeros(2, n_layers, dtype=torch.long, device=device)   # rows a kernel gathered:
        self.row_bytes, self.decoding, self.decode_h2d = row_bytes, False, 0    # (2, L) at prefill, in steps
        self.wait_s = self.decode_wait_s = 0.0    # the compute stream's waits for copies: in all, in steps

    def add(self, layer, nbytes):  # bytes (an int) known on the host
        self.h2d[layer] += nbytes
        self.decode_h2d += nbytes if self.decoding else 0

    def counter(self, layer):  # where a device gather adds the rows it moved: (1,) on the device
        return self.rows[int(self.decoding), layer:layer + 1]

    def waited(self, seconds):
        self.wait_s += seconds
        self.decode_wait_s += seconds if self.decoding else 0.0

    def host_counts(self):  # the counters the host keeps, as one list
        return self.h2d + self.d2h + [self.decode_h2d]

    def add_host_counts(self, delta):  # what a replayed CUDA graph's step adds: what recording it counted
        L = len(self.h2d)
        self.h2d = [a + b for a, b in zip(self.h2d, delta[:L])]
        self.d2h = [a + b for a, b in zip(self.d2h, delta[L:2 * L])]
        self.decode_h2d += delta[-1]

    def h2d_per_layer(self):  # (reads the device counters: after the run)
        return [h + r * self.row_bytes for h, r in zip(self.h2d, self.rows.sum(0).tolist())]

    def decode_bytes(self):
        return self.decode_h2d + int(self.rows[1].sum()) * self.row_bytes


# --- Bounded pool
class Pool:
    """At most `capacity` tokens per (layer, sequence) may live in the store's slots.

    `where[l][b, t]` is token t's store slot or -1 when it is not (or no longer) resident;
    `owner[l][b, p]` is the token in slot p or -1. Eviction picks the victim among resident tokens:
    fifo (oldest), lru (least recently fetched) or counter (fewest fetches among the older half).
    """
    def __init__(self, n_layers, batch, tokens, capacity, policy="counter"):
        assert policy in ("fifo", "lru", "counter"), policy
        self.cap, self.policy = capacity, policy
        self.where = torch.full((n_layers, batch, tokens), -1, dtype=torch.long)     # (L, B, S)
        self.owner = torch.full((n_layers, batch, capacity), -1, dtype=torch.long)   # (L, B, P)
        self.fetches = torch.zeros(n_layers, batch, tokens, dtype=torch.long)        # (L, B, S)
        self.last_use = torch.zeros(n_layers, batch, tokens, dtype=torch.long)       # (L, B, S)
        self.clock, self.misses, self.requests = 0, 0, 0

    def admit(self, layer, t0, valid=None):
        """Slots for tokens t0..t0+T-1 of every sequence (valid (B, T), None = all): (B, T), -1 for a pad
        or a token evicted again in this call. As if admitted one at a time in position order, with
        tensor operations over the batch: the tokens that find a free slot take theirs at once; each
        of the others evicts a victim, one round per eviction for all sequences together."""
        owner, where = self.owner[layer], self.where[layer]                      # (B, P), (B, S)
        P = owner.shape[1]
        valid = torch.ones(owner.shape[0], 1, dtype=torch.bool) if valid is None else valid   # (B, T)
        T = valid.shape[1]
        tok = torch.arange(t0, t0 + T).expand_as(valid)                          # (B, T) token ids
        self.last_use[layer, :, t0:t0 + T].masked_fill_(valid, self.clock)       # admitted counts as a use
        rank = valid.cumsum(1) - 1                                               # (B, T) among the new
        free = P - (owner >= 0).sum(1, keepdim=True)            # (B, 1) free slots: the last `free` ones
        b, j = (valid & (rank < free)).nonzero(as_tuple=True)
        p = P - free[b, 0] + rank[b, j]                                          # the free slots in order
        owner[b, p], where[b, tok[b, j]] = tok[b, j], p
        for i in range(int((valid.sum(1, keepdim=True) - free).max().clamp(min=0))):
            b, j = (valid & (rank == free + i)).nonzero(as_tuple=True)          # each one's i-th eviction
            p = self.victim(layer, b)
            where[b, owner[b, p]] = -1
            owner[b, p], where[b, tok[b, j]] = tok[b, j], p
        return where[:, t0:t0 + T].clone()

    def victim(self, layer, b):
        """The slot that each sequence b (n,), its pool full, gives up: fifo the oldest token's, lru the
        least recently used one's, counter the least fetched among the older half; ties: the oldest
        token, not the lowest slot (a new token takes its victim's slot; a dense fetch stamps all alike)."""
        res = self.owner[layer, b]                                               # (n, P) tokens resident
        if self.policy == "lru":
            key = self.last_use[layer, b[:, None], res]                          # (n, P)
        elif self.policy == "counter":
            older = res <= res.median(1, keepdim=True).values                    # (n, P) the older half
            key = self.fetches[layer, b[:, None], res].masked_fill(~older, torch.iinfo(torch.long).max)
        else:
            key = torch.zeros_like(res)                                          # fifo: all tie
        tie = key == key.min(1, keepdim=True).values
        return res.masked_fill(~tie, torch.iinfo(torch.long).max).argmin(1)

    def touch(self, layer, idx, ok):
        """Record a fetch of tokens idx (B, Hkv, n) where ok; count misses; return slots (-1 = miss)."""
        self.clock += 1
        B = idx.shape[0]
        slots = torch.gather(self.where[layer], 1, idx.reshape(B, -1)).view_as(idx)   # (B, Hkv, n)
        hit = ok & (slots >= 0)
        self.requests += int(ok.sum())
        self.misses += int((ok & (slots < 0)).sum())
        flat = idx.reshape(B, -1)
        self.fetches[layer].scatter_add_(1, flat, hit.reshape(B, -1).long())
        stamp = hit.reshape(B, -1).long() * self.clock
        self.last_use[layer].scatter_reduce_(1, flat, stamp, reduce="amax")
        return torch.where(hit, slots, -1)


# --- CPU KV store
def kv_rows(k, v, out=None):
    """K, V (B, Hkv, T, d) -> their rows (T, B, Hkv, 2, d), as the store and its device buffers lay tokens
    out (a token's K and V of a head side by side); out: rows to write them into, such as a buffer's."""
    out = v.new_empty(v.shape[2], *v.shape[:2], 2, v.shape[3]) if out is None else out
    return torch.stack([k, v], 3, out=out.permute(1, 2, 0, 3, 4)).permute(2, 0, 1, 3, 4)   # one kernel


class KVStore:
    """K and V of layers first..L-1 in CPU memory (pinned with CUDA), allocated once, and two device
    buffers the fetches land in. Layers before `first` are not here: their cache keeps them on the
    device. `device_extra`: the caller's other device bytes, for the preflight."""
    def __init__(self, n_layers, batch, slots, n_kv, head_dim, device, dtype, pool: Pool | None = None,
                 gather="host", first=0, device_extra=0):
        self.L, self.B, self.S, self.Hkv, self.d, self.first = n_layers, batch, slots, n_kv, head_dim, first
        self.device, self.cuda, self.pool = device, device.type == "cuda", pool
        self.gather = gather_mode(gather, device)
        P = pool.cap if pool else slots
        elt = torch.tensor([], dtype=dtype).element_size()
        self.row_bytes = 2 * head_dim * elt                                  # one token's K and V of one head
        rows = slots * batch * n_kv
        host_path = self.gather == "host"
        staging = host_path * 2 * rows * (self.row_bytes + 8)           # rows and their positions, twice
        host = (n_layers - first) * P * batch * n_kv * self.row_bytes + staging
        dev = 2 * rows * self.row_bytes + staging + device_extra          # buffers (and landing rows)
        preflight(host, dev, device)
        pin = self.cuda
        # (L - first, P, B, Hkv, 2, d), P = the pool's capacity or S
        self.kv = host_tensor((n_layers - first, P, batch, n_kv, 2, head_dim), dtype, pin)
        if host_path:  # per buffer parity (rows, 2, d): pinned staging rows and where they land on the device
            self.stage = [host_tensor((rows, 2, head_dim), dtype, pin) for _ in range(2)]
            self.stage_pos = [host_tensor((rows,), torch.long, pin) for _ in range(2)]
            self.land = [torch.empty(rows, 2, head_dim, dtype=dtype, device=device) for _ in range(2)]
            self.land_pos = [torch.empty(rows, dtype=torch.long, device=device) for _ in range(2)]
        # Two device buffers (even and odd layers): layer i+1's copy lands while layer i reads its own.
        self.buf = [torch.zeros(slots, batch, n_kv, 2, head_dim, dtype=dtype, device=device)
                    for _ in range(2)]                                       # (S, B, Hkv, 2, d)
        # The copy stream, of high priority: the next layer waits on its rows. (It also keeps it out of the
        # pool of 32 default-priority streams torch hands out in turn, one of which records CUDA graphs.)
        self.stream = torch.cuda.Stream(device, priority=-1) if self.cuda else None
        self.ready = [None, None]           # per buffer: the event its last copy recorded (copy stream)
        self.freed = [None, None]           # per buffer: an event after its last reader (compute stream)
        self.appended = [None] * n_layers   # per layer: the event after its last device->host append
        self.trace = None                   # a list to record ("copy", layer, start, end) marks into
        self.timing = False                 # CUDA: time the compute stream's waits with events
        self.wait_events = []               # (before, after) event pairs, harvested every step
        self.ledger = Ledger(n_layers, device, self.row_bytes)

    def local(self, layer):  # the store's index of a model layer
        return layer - self.first

    # --- Append
    def append(self, layer, t0, kv, valid=None, at=None):
        """Write the new tokens' rows kv (T, B, Hkv, 2, d) (`kv_rows`) on the device into slots t0..t0+T
        (device->host); at (T,): the same slots on the device; valid (B, T) on the host: which are real
        tokens (only the pool needs it). The device path writes through `at` (kernel.put_rows), so a CUDA
        graph that replays the write puts each step's token in its own slot; the host path copies to t0."""
        store = self.kv[self.local(layer)]
        if self.pool is None:  # asynchronous on CUDA; whoever reads this layer waits for `appended`
            if self.gather == "device":
                at = torch.arange(t0, t0 + kv.shape[0], device=kv.device) if at is None else at
                device_kernel("put_rows", self.cuda)(kv, at, store)
            else:
                store[t0:t0 + kv.shape[0]].copy_(kv, non_blocking=True)
            if self.cuda:
                self.appended[layer] = torch.cuda.Event()
                self.appended[layer].record()
        else:
            valid = torch.ones(self.B, kv.shape[0], dtype=torch.bool) if valid is None else valid.cpu()
            slots = self.pool.admit(self.local(layer), t0, valid)            # (B, T), -1: not stored
            rows = slots.t() * (self.B * self.Hkv)                           # (T, B) first row of each token
            rows = rows[:, :, None] + torch.arange(self.B * self.Hkv).view(self.B, self.Hkv)
            keep = (slots.t() >= 0)[:, :, None].expand_as(rows)               # (T, B, Hkv)
            store.view(-1, 2, self.d).index_copy_(0, rows[keep], kv.cpu()[keep])
        self.ledger.d2h[layer] += kv.numel() * kv.element_size()

    def keys(self, layer, t0, device):
        """Every past key of a layer as stored, (B, Hkv, t0, d) on `device`: for the oracle and recall,
        which read everything (so they refuse a bounded pool, whose slots are not token order)."""
        block = self.kv[self.local(layer), :t0]                              # (t0, B, Hkv, 2, d)
        if device.type == "cuda":                     # the whole block, queued after the append
            block = block.to(device, non_blocking=True)
        elif self.appended[layer] is not None:
            self.appended[layer].synchronize()
        return block[:, :, :, 0].permute(1, 2, 0, 3)

    # --- Fetch
    def fetch(self, layer, t0, idx=None, ok=None, after=None):
        """Start copying layer's past K, V to the device: all of slots 0..t0 (idx None), or for
        each (b, h) the slots idx (B, Hkv, n) where ok. after: an event recorded once idx and ok
        were computed (CUDA). Returns a handle for `take`."""
        buf, start = layer % 2, time.perf_counter()
        if self.cuda:  # the buffer must not be overwritten while layer-2 still reads it
            cur = torch.cuda.current_stream(self.device)    # the compute stream
            if self.freed[buf] is None:                     # nothing read it yet: after everything before
                self.stream.wait_stream(cur)
            else:
                self.stream.wait_event(self.freed[buf])
            for ev in (self.appended[layer], after):        # the store holds this layer's last token,
                if ev is not None:                           # and the selection is made
                    self.stream.wait_event(ev)
        store = self.kv[self.local(layer)]
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            t_start = mark(self.cuda) if self.trace is not None else None
            if idx is None:
                n = t0
                assert self.pool is None or n == 0, "with a bounded pool, fetch by index"
                self.buf[buf][:n].copy_(store[:n], non_blocking=True)
                self.ledger.add(layer, n * self.B * self.Hkv * self.row_bytes)
            else:
                n = idx.shape[2]
                if self.pool is not None:                   # slots of the resident tokens (host, syncs)
                    slots = self.pool.touch(self.local(layer), idx.cpu(), ok.cpu())
                    idx, ok = slots.clamp(min=0), ok.cpu() & (slots >= 0)
                if self.gather == "device":
                    idx, ok = idx.to(self.device, non_blocking=True), ok.to(self.device, non_blocking=True)
                    if self.cuda:           # read on both streams (made on either one)
                        for s in (self.stream, cur):
                            idx.record_stream(s), ok.record_stream(s)
                    gather = device_kernel("gather_rows", self.cuda)          # it counts its rows itself
                    gather(store, idx, ok, self.buf[buf], self.ledger.counter(layer))
                else:
                    ok = self.host_gather(layer, buf, store, idx, ok)
            if self.cuda:
                self.ready[buf] = torch.cuda.Event()
                self.ready[buf].record(self.stream)
            if t_start is not None:
                self.trace.append(("copy", layer, t_start, mark(self.cuda)))
        if not self.cuda:                                    # no stream: the compute waits for the whole copy
            self.ledger.waited(time.perf_counter() - start)
        return buf, n, ok

    # --- Host gather
    def host_gather(self, layer, buf, store, idx, ok):
        """The reference path: the CPU gathers the wanted rows into pinned staging, one copy sends them
        with their positions, index_copy_ puts them in place. Returns ok, pinned (on the host)."""
        idx, ok = idx.cpu(), ok.cpu()                                    # the sync of this path
        if self.cuda:
            if self.appended[layer] is not None:
                self.appended[layer].synchronize()                      # the CPU reads the store itself
            ok = ok.pin_memory()                                         # so it can go to the device async
        off = torch.arange(self.B * self.Hkv).view(self.B, self.Hkv, 1)          # b * Hkv + h
        rows = (idx * (self.B * self.Hkv) + off).permute(2, 0, 1).reshape(-1)    # (n*B*Hkv,)
        pos = ok.permute(2, 0, 1).reshape(-1).nonzero().squeeze(1)      # only wanted rows travel
        m = pos.numel()
        sk, sp = self.stage[buf][:m], self.stage_pos[buf][:m]
        if self.cuda and self.ready[buf] is not None:
            self.ready[buf].synchronize()                          # the last copy out of this staging is done
        torch.index_select(store.view(-1, 2, self.d), 0, rows[pos], out=sk)
        sp.copy_(pos)
        dk, dp = self.land[buf][:m], self.land_pos[buf][:m]
        dk.copy_(sk, non_blocking=True), dp.copy_(sp, non_blocking=True)
        self.buf[buf].view(-1, 2, self.d).index_copy_(0, dp, dk)       # into place, on the device
        self.ledger.add(layer, m * (self.row_bytes + sp.element_size()))
        return ok

    # --- Take
    def take(self, handle):
        """Wait (on the compute stream) for a fetch; return its device buffer kv (S, B, Hkv, 2, d), n, ok."""
        buf, n, ok = handle
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            before = torch.cuda.Event(enable_timing=self.timing)
            before.record(cur)                               # everything queued so far, layer-1's
            self.freed[1 - buf] = before                     # attention included, has read the other buffer
            cur.wait_event(self.ready[buf])
            if self.timing:
                after = torch.cuda.Event(enable_timing=True)
                after.record(cur)
                self.wait_events.append((before, after))
        return self.buf[buf], n, ok

    def forget_events(self, replayed=False):
        """Before a CUDA graph records a step: no wait on an event of an earlier step. After each replay: the
        events recorded while recording belong to the graph (CUDA refuses a wait on them outside it), so one
        event after the replay stands for them all, for whatever runs next outside the graph."""
        ev = torch.cuda.current_stream(self.device).record_event() if replayed and self.cuda else None
        self.appended, self.ready, self.freed = [ev] * self.L, [ev, ev], [ev, ev]

    def step_done(self):
        """The end of a step (the host's part): the copy-wait events of a timed run are read and dropped
        (a sync)."""
        self.freed = [None, None]
        if self.wait_events:
            torch.cuda.synchronize(self.device)
            self.ledger.waited(sum(a.elapsed_time(b) for a, b in self.wait_events) / 1e3)
            self.wait_events.clear()

    def wait_seconds(self):
        """Compute-stream time spent waiting on copies, in all and in decode steps (CPU: all copy time;
        CUDA: when timed, else None)."""
        return (self.ledger.wait_s, self.ledger.decode_wait_s) if not self.cuda or self.timing else None


# --- Timeline marks
def mark(cuda):
    """A point in time for a timeline: an event on the current CUDA stream, or the host clock."""
    if not cuda:
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


# --- Statistics
def stats_of(model, cache, t_prefill, t_decode, steps, B):
    """What `--json` reports of a run: timings and KV size; for an offloaded policy also bytes host->device
    per step, the KV kept on the device, fetched share per layer, copy wait, recall (when measured) and
    pool misses."""
    cfg = model.cfg
    elt = next(model.parameters()).element_size()
    per_layer = 2 * cfg.n_kv_heads * cfg.head_dim * elt * int(cache.length.sum())   # K and V of one layer
    s = {"prefill_s": round(t_prefill, 4), "decode_s": round(t_decode, 4), "decode_steps": steps,
         "tokens_per_s": round(B * steps / t_decode, 2) if t_decode > 0 and steps > 0 else None,
         "kv_bytes": cfg.n_layers * per_layer}
    if hasattr(cache, "store"):                            # an offloaded policy
        store, n, first = cache.store, max(cache.decode_steps, 1), cache.first
        waited, waited_steps = store.wait_seconds() or (None, None)        # None: not timed
        s.update(h2d_bytes_per_step=round(store.ledger.decode_bytes() / n) if cache.decode_steps else 0,
                 kv_resident_bytes=first * per_layer, gather=store.gather,
                 fetched_fraction_per_layer=[1.0 if i < first else round(f / n, 4)
                                             for i, f in enumerate(cache.fetched.tolist())],
                 copy_wait_s=None if waited is None else round(waited, 4),
                 copy_wait_per_step_s=None if waited is None else round(waited_steps / n, 6))
        if cache.pol.measure_recall:
            dense = cache.cfg.n_layers if cache.name == "offload" else cache.pol.dense_layers  # recall 1
            s["recall_per_layer"] = [1.0 if i < dense else round(r / n, 4)
                                     for i, r in enumerate(cache.recall.tolist())]
        if store.pool:
            s["pool_misses"], s["pool_requests"] = store.pool.misses, store.pool.requests
    return s
