"""The CPU side of the KV cache: the store, the staging buffers, the copy stream, the ledger, the pool, the run statistics.

Layout of the store: per layer (S, B, Hkv, d), token-major. The first t tokens of a layer are then
one contiguous block (one DMA for a dense fetch), and the rows a selection needs are whole d-vectors
found by one flat index: row = slot * B * Hkv + b * Hkv + h.
On a machine without CUDA the "device" is the CPU, the stream is None, and the same gathers and
copies run as plain copies, so the tests exercise this very code.
"""
import contextlib
import time

import torch


class OffloadError(Exception):
    """A user-facing problem (memory, capacity): printed as one line."""


# --- Memory preflight
def host_available():  # bytes of CPU memory the OS says it can still give
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def preflight(host_bytes, device_bytes, device):
    """Refuse, naming the sizes, when the store or the device buffers cannot fit."""
    gb = lambda n: f"{n / 2**30:.2f} GiB"
    avail = host_available()
    if avail is not None and host_bytes > 0.9 * avail:
        raise OffloadError(f"CPU KV store needs {gb(host_bytes)} but only {gb(avail)} of host memory is available")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if device_bytes > 0.9 * free:
            raise OffloadError(f"device KV buffers need {gb(device_bytes)} but only {gb(free)} is free on {device}")


# --- Ledger
class Ledger:
    """Bytes copied host->device and device->host, per layer, per step; and copy-wait time."""
    def __init__(self, n_layers):
        self.h2d, self.d2h = [0] * n_layers, [0] * n_layers
        self.steps, self.wait_s, self.step_h2d = 0, 0.0, []

    def step_done(self):
        self.steps += 1
        self.step_h2d.append(sum(self.h2d) - sum(self.step_h2d))


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

    def admit(self, layer, b, t):
        """A slot for token t of sequence b, evicting one resident token when the pool is full."""
        free = (self.owner[layer, b] < 0).nonzero()
        if len(free):
            p = int(free[0])
        else:
            res = self.owner[layer, b]                                  # (P,) tokens resident
            if self.policy == "fifo":
                victim = int(res.min())
            elif self.policy == "lru":
                victim = int(res[self.last_use[layer, b, res].argmin()])
            else:  # counter: among the older half of the residents, the least often fetched
                old = res[res <= res.median()]
                victim = int(old[self.fetches[layer, b, old].argmin()])
            p = int((res == victim).nonzero()[0])
            self.where[layer, b, victim] = -1
        self.owner[layer, b, p], self.where[layer, b, t] = t, p
        self.last_use[layer, b, t] = self.clock                          # admitted counts as a use
        return p

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
        self.last_use[layer].scatter_reduce_(1, flat, hit.reshape(B, -1).long() * self.clock, reduce="amax")
        return torch.where(hit, slots, -1)


# --- CPU KV store
class KVStore:
    """Keys and values of every layer in CPU memory, pinned when CUDA is present, allocated once."""
    def __init__(self, n_layers, batch, slots, n_kv, head_dim, device, dtype, pool: Pool | None = None):
        self.L, self.B, self.S, self.Hkv, self.d = n_layers, batch, slots, n_kv, head_dim
        self.device, self.cuda = device, device.type == "cuda"
        self.pool = pool
        P = pool.cap if pool else slots
        elt = torch.tensor([], dtype=dtype).element_size()
        self.row_bytes = head_dim * elt
        rows = slots * batch * n_kv
        host = 2 * n_layers * P * batch * n_kv * head_dim * elt + 4 * rows * head_dim * elt + 2 * rows * 8
        dev = 4 * 2 * slots * batch * n_kv * head_dim * elt                 # buffers and landing rows
        preflight(host, dev, device)
        pin = self.cuda
        self.k = torch.empty(n_layers, P, batch, n_kv, head_dim, dtype=dtype, pin_memory=pin)   # (L, S|P, B, Hkv, d)
        self.v = torch.empty_like(self.k, pin_memory=pin)
        # Staging rows for gathers, one pair per buffer parity: (rows, d)
        self.stage_k = [torch.empty(slots * batch * n_kv, head_dim, dtype=dtype, pin_memory=pin) for _ in range(2)]
        self.stage_v = [torch.empty_like(b, pin_memory=pin) for b in self.stage_k]
        self.stage_pos = [torch.empty(slots * batch * n_kv, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        # Where gathered rows land on the device before index_copy_ puts them in place: (rows, d)
        self.land_k = [torch.empty(slots * batch * n_kv, head_dim, dtype=dtype, device=device) for _ in range(2)]
        self.land_v = [torch.empty_like(b) for b in self.land_k]
        self.land_pos = [torch.empty(slots * batch * n_kv, dtype=torch.long, device=device) for _ in range(2)]
        # Two device buffers (even and odd layers): layer i+1's copy lands while layer i reads its own.
        self.buf_k = [torch.zeros(slots, batch, n_kv, head_dim, dtype=dtype, device=device) for _ in range(2)]  # (S, B, Hkv, d)
        self.buf_v = [torch.zeros_like(b) for b in self.buf_k]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready = [None, None]           # per buffer: the event its last copy recorded (copy stream)
        self.freed = [None, None]           # per buffer: an event after its last reader (compute stream)
        self.appended = [None] * n_layers   # per layer: the event after its last device->host append
        self.trace = None                   # a list to record ("copy", layer, start, end) marks into
        self.wait_events = []               # (before, after) pairs on the compute stream
        self.ledger = Ledger(n_layers)

    # --- Append
    def append(self, layer, t0, k, v):
        """Write the new tokens' K, V (B, Hkv, T, d) on the device into slots t0..t0+T (device->host)."""
        T = k.shape[2]
        kt, vt = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)                 # (T, B, Hkv, d)
        if self.pool is None:  # asynchronous on CUDA; a fetch of this layer waits for `appended`
            self.k[layer, t0:t0 + T].copy_(kt.contiguous(), non_blocking=True)
            self.v[layer, t0:t0 + T].copy_(vt.contiguous(), non_blocking=True)
            if self.cuda:
                self.appended[layer] = torch.cuda.Event()
                self.appended[layer].record()
        else:
            kt, vt = kt.cpu(), vt.cpu()
            for b in range(self.B):
                for j in range(T):
                    p = self.pool.admit(layer, b, t0 + j)
                    self.k[layer, p, b], self.v[layer, p, b] = kt[j, b], vt[j, b]
        self.ledger.d2h[layer] += 2 * k.numel() * k.element_size()

    def keys(self, layer, t0):
        """Every past key of a layer as stored, (B, Hkv, t0, d) on the host: for the oracle and recall,
        which read everything (so they refuse a bounded pool, whose slots are not token order)."""
        return self.k[layer, :t0].permute(1, 2, 0, 3)

    # --- Fetch
    def fetch(self, layer, t0, idx=None, ok=None):
        """Start copying layer's past K, V to the device: all of slots 0..t0 (idx None), or for
        each (b, h) the slots idx (B, Hkv, n) where ok. Returns a handle for `take`."""
        buf, start = layer % 2, time.perf_counter()
        if self.cuda:  # the buffer must not be overwritten while layer-2 still reads it
            if layer == 0 or self.freed[buf] is None:       # a new step: after everything before
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            else:
                self.stream.wait_event(self.freed[buf])
            if self.appended[layer] is not None:            # the store holds this layer's last token
                self.stream.wait_event(self.appended[layer])
                if idx is not None:                          # the host gather reads the store itself
                    self.appended[layer].synchronize()
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            first = mark(self.cuda) if self.trace is not None else None
            if idx is None:
                n = t0
                assert self.pool is None or n == 0, "with a bounded pool, fetch by index"
                self.buf_k[buf][:n].copy_(self.k[layer, :n], non_blocking=True)
                self.buf_v[buf][:n].copy_(self.v[layer, :n], non_blocking=True)
                moved = 2 * n * self.B * self.Hkv * self.row_bytes
            else:
                idx, ok = idx.cpu(), ok.cpu()                                # the one sync of a sparse step
                slots = self.pool.touch(layer, idx, ok) if self.pool else idx
                ok = ok & (slots >= 0)
                ok = ok.pin_memory() if self.cuda else ok                    # so it can go to the device async
                n = idx.shape[2]
                off = torch.arange(self.B * self.Hkv).view(self.B, self.Hkv, 1)     # b * Hkv + h
                rows = (slots.clamp(min=0) * (self.B * self.Hkv) + off).permute(2, 0, 1).reshape(-1)  # (n*B*Hkv,)
                pos = ok.permute(2, 0, 1).reshape(-1).nonzero().squeeze(1)   # only wanted rows travel
                m = pos.numel()
                sk, sv, sp = self.stage_k[buf][:m], self.stage_v[buf][:m], self.stage_pos[buf][:m]
                if self.cuda and self.ready[buf] is not None:
                    self.ready[buf].synchronize()                  # the last copy out of this staging is done
                torch.index_select(self.k[layer].view(-1, self.d), 0, rows[pos], out=sk)
                torch.index_select(self.v[layer].view(-1, self.d), 0, rows[pos], out=sv)
                sp.copy_(pos)
                dk, dv, dp = self.land_k[buf][:m], self.land_v[buf][:m], self.land_pos[buf][:m]
                dk.copy_(sk, non_blocking=True), dv.copy_(sv, non_blocking=True), dp.copy_(sp, non_blocking=True)
                self.buf_k[buf].view(-1, self.d).index_copy_(0, dp, dk)     # into place, on the device
                self.buf_v[buf].view(-1, self.d).index_copy_(0, dp, dv)
                moved = 2 * m * self.row_bytes + m * sp.element_size()
            if self.cuda:
                self.ready[buf] = torch.cuda.Event()
                self.ready[buf].record(self.stream)
            if first is not None:
                self.trace.append(("copy", layer, first, mark(self.cuda)))
        self.ledger.h2d[layer] += moved
        if not self.cuda:                                    # no stream: the compute waits for the whole copy
            self.ledger.wait_s += time.perf_counter() - start
        return buf, n, ok

    def take(self, handle):
        """Wait (on the compute stream) for a fetch; return device K, V views (S, B, Hkv, d)."""
        buf, n, ok = handle
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(cur)                               # everything queued so far, layer-1's
            self.freed[1 - buf] = before                     # attention included, has read the other buffer
            cur.wait_event(self.ready[buf])
            after.record(cur)
            self.wait_events.append((before, after))
        return self.buf_k[buf], self.buf_v[buf], n, ok

    def wait_seconds(self):
        """Compute-stream time spent waiting on copies since the last call (synchronizes)."""
        if self.cuda and self.wait_events:
            torch.cuda.synchronize(self.device)
            self.ledger.wait_s += sum(a.elapsed_time(b) for a, b in self.wait_events) / 1e3
            self.wait_events.clear()
        return self.ledger.wait_s


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
    per step, fetched share per layer, copy wait, recall (when measured) and pool misses."""
    cfg = model.cfg
    elt = next(model.parameters()).element_size()
    s = {"prefill_s": round(t_prefill, 4), "decode_s": round(t_decode, 4), "decode_steps": steps,
         "tokens_per_s": round(B * steps / t_decode, 2) if t_decode > 0 and steps > 0 else None,
         "kv_bytes": 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * elt * int(cache.length.sum())}
    if hasattr(cache, "store"):                            # an offloaded policy
        led, n = cache.store.ledger, max(cache.decode_steps, 1)
        s.update(h2d_bytes_per_step=round(sum(led.step_h2d[-cache.decode_steps:]) / n) if cache.decode_steps else 0,
                 fetched_fraction_per_layer=[round(f / n, 4) for f in cache.fetched.tolist()],
                 copy_wait_s=round(cache.store.wait_seconds(), 4))
        if cache.pol.measure_recall:
            dense = cache.cfg.n_layers if cache.name == "offload" else cache.pol.dense_layers   # recall 1 there
            s["recall_per_layer"] = [1.0 if i < dense else round(r / n, 4) for i, r in enumerate(cache.recall.tolist())]
        if cache.store.pool:
            s["pool_misses"], s["pool_requests"] = cache.store.pool.misses, cache.store.pool.requests
    return s
