"""The copy stream's ordering, checked on the CPU: no race between the streams and the host, and a decode
step a CUDA graph can record.

On a GPU, KVStore.fetch copies on its own stream while the compute stream runs the layers, and with the
host gather or the bounded pool the host reads and writes pinned memory itself; events, waits and
blocking copies are all that orders them. A missing wait gives no error there, only wrong numbers now
and then. Here the same code runs against a model of CUDA's semantics: streams and events are
stand-ins, every tensor operation is logged on whoever runs it (a TorchDispatchMode; the kernels by what
they read and write), and vector clocks give "happens before". All tensors stay on the CPU; the model
keeps which memory is the host's (the store, the staging rows, the pool's tables, what `.cpu()` made)
and which the device's. An operation that touches device memory is queued on the current stream, after
everything the host did before issuing it; one that touches only host memory runs on the host. A
blocking copy, an event's `synchronize` and a read of a device value make the host wait. Every write
must happen after the earlier reads and writes of the same bytes by others, every read after the last
write. While a graph records, a stream may wait only on events recorded inside the recording, every
stream that joined must be joined back at its end, no stream outside it may work, and the host may
not wait.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

import infinigen as IG
import offload
import skew as SK
from infinigen import Policy
from test_graphs import HOST_READS, torch_put
from test_policies import hf_random, padded, torch_gather


# --- A model of CUDA streams and events
class Stream:
    def __init__(self, sim, name):
        self.sim, self.name, self.vc = sim, name, {}

    def wait_event(self, ev):
        self.sim.wait(self, ev)

    def wait_stream(self, other):
        self.wait_event(other.record_event())

    def record_event(self, ev=None):   # as torch.cuda.Stream.record_event
        ev = ev or Event()
        ev.record(self)
        return ev

    def __repr__(self):
        return self.name


class Event:
    sim = None                                           # the simulation in force

    def __init__(self, enable_timing=False):
        self.vc, self.captured = None, False

    def record(self, stream=None):
        self.sim.record(self, stream or self.sim.cur)

    def synchronize(self):
        self.sim.host_waits(None if self.sim.ignore(self, self.sim.host) else self.vc, "Event.synchronize")


class Device:   # the device as the engine sees it in the model: type "cuda"; its tensors stay on the CPU
    type, index = "cuda", 0


def join(vc, *others):
    for other in others:
        for k, c in (other or {}).items():
            vc[k] = max(vc.get(k, 0), c)
    return vc


class Sim(TorchDispatchMode):
    """Streams, events, the host, and every tensor access. races: conflicting accesses with no order
    between them; errors: what CUDA would refuse while a graph records."""
    def __init__(self, ignore=lambda ev, who: False):
        super().__init__()
        self.compute, self.copy, self.host = (Stream(self, n) for n in ("compute", "copy", "host"))
        self.cur, self.ignore, self.races, self.errors = self.compute, ignore, [], []
        self.acc = {}                                    # storage -> {(agent, kind, lo, hi): clock}
        self.where = {}                                  # storage -> "host" | "device" | "new" (either)
        self.capturing = None                            # the streams in the recording, or None
        self.op = None                                   # the operation being logged

    # streams, events, the host
    def tick(self, s):
        if s is not self.host:                           # issued by the host: after what it did before
            if self.capturing is not None and s not in self.capturing:
                self.errors.append(f"work on {s} outside the recording")
            join(s.vc, self.host.vc)
        s.vc[s] = s.vc.get(s, 0) + 1
        return s.vc

    def record(self, ev, s):
        self.tick(s)
        ev.vc, ev.captured = dict(s.vc), self.capturing is not None

    def wait(self, s, ev):
        if ev.vc is None or self.ignore(ev, s):          # never recorded: CUDA waits for nothing
            return
        if self.capturing is not None:
            if not ev.captured:
                self.errors.append(f"{s} waits on an event recorded before the recording")
            self.capturing.add(s)
        join(s.vc, ev.vc)

    def host_waits(self, vc, what):
        if self.capturing is not None:
            self.errors.append(f"the host waits while a graph records ({what})")
        join(self.host.vc, vc)

    @contextlib.contextmanager
    def stream(self, s):
        before, self.cur = self.cur, s
        try:
            yield
        finally:
            self.cur = before

    @contextlib.contextmanager
    def recording(self):
        self.capturing = {self.compute}
        yield
        for s in self.capturing:
            if s is not self.compute and self.compute.vc.get(s, 0) < s.vc.get(s, 0):
                self.errors.append(f"{s} is not joined back at the end of the recording")
        self.capturing = None

    # memory: the host's or the device's
    def place(self, t):
        return self.where.get(t.untyped_storage().data_ptr(), "device")

    def made(self, where, *ts):   # memory new here ("host", "device" or "new": either), no access before
        for t in ts:
            base = t.untyped_storage().data_ptr()
            self.acc.pop(base, None)
            self.where[base] = where

    def moved(self, t, where, non_blocking=False):
        """t.cpu() / t.to(...): a copy on the current stream when it crosses to the other side."""
        if self.place(t) in (where, "new"):
            return t
        with _disable_current_modes():
            out = t.clone()
        self.op = f"copy to the {where}"
        self.made(where, out)
        self.access([t], [out])
        if not non_blocking:
            self.host_waits(self.cur.vc, f"a blocking {self.op}")
        return out

    # accesses
    def access(self, reads, writes, agent=None):
        s = agent or self.cur
        vc = self.tick(s)
        for t, kind in [(t, "r") for t in reads] + [(t, "w") for t in writes]:
            if t.numel() == 0:
                continue
            base, lo = t.untyped_storage().data_ptr(), t.data_ptr()
            hi = lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
            book = self.acc.setdefault(base, {})
            for (s2, k2, lo2, hi2), c in book.items():
                if s2 is not s and lo2 < hi and lo < hi2 and "w" in (kind, k2) and vc.get(s2, 0) < c:
                    self.races.append(f"{kind} on {s} after {k2} on {s2} with no order: {self.op}")
            book[(s, kind, lo, hi)] = vc[s]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema, self.op = func._schema, str(func)
        if "lift_fresh" in self.op:                      # torch.tensor(...), x[i] = 1.0: a new constant
            self.made("new", out)
            return out
        written = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
        if any(r.alias_info is not None for r in schema.returns) and not any(written):
            return out                                   # a view: no memory is touched
        tensors = lambda xs: [t for t in tree_leaves(xs) if isinstance(t, torch.Tensor)]
        named = dict(zip([a.name for a in schema.arguments], args)) | kwargs
        writes = tensors([named.get(a.name) for a, w in zip(schema.arguments, written) if w])
        outs = [t for t in tensors(out) if not any(t is w for w in writes)]
        ins = tensors((args, kwargs))
        places = {self.place(t) for t in ins}
        where = "device" if "device" in places else "host" if "host" in places else "new"
        self.made(where, *outs)                          # new memory, where it was made
        if where == "new":                               # made from nothing but new memory: no one else's
            return out
        agent = self.cur if where == "device" else self.host
        self.access(ins, writes + outs, agent=agent)
        if where == "device" and str(func).split(".")[1] in HOST_READS:
            self.host_waits(agent.vc, f"a read of a device value ({func})")
        return out

    def kernel(self, fn, reads):                # a kernel: reads its first arguments, writes the others
        def run(*args):
            self.op = fn.__name__
            self.access(args[:reads], args[reads:])
            with _disable_current_modes():
                fn(*args)
        return run


@contextlib.contextmanager
def simulated(cache, monkeypatch, **kw):
    """Run a cache's steps as if on CUDA: its store copies on the simulated copy stream; the store, its
    staging rows and the pool's tables are host memory."""
    sim, store = Sim(**kw), cache.store
    Event.sim = sim
    store.cuda, store.stream, store.device, cache.dev = True, sim.copy, Device(), Device()
    sim.store = store.kv.untyped_storage().data_ptr()
    pool = store.pool
    sim.made("host", store.kv, cache.need, cache.recall, cache.share, *getattr(store, "stage", []),
            *getattr(store, "stage_pos", []), *([pool.where, pool.owner, pool.fetches, pool.last_use]
                                                if pool else []))
    kernels = {"gather_rows": sim.kernel(torch_gather, 3), "put_rows": sim.kernel(torch_put, 2)}
    to = torch.Tensor.to

    def moved_to(t, *args, **kw):   # .to("cpu") means the host, .to(a device) the device
        dev, nb = kw.pop("device", None), kw.pop("non_blocking", False)
        rest = [a for a in args if not isinstance(a, (str, torch.device, Device, bool))]
        dev = next((a for a in args if isinstance(a, (str, torch.device, Device))), dev)
        nb = next((a for a in args if isinstance(a, bool)), nb)
        if dev is not None:
            t = sim.moved(t, "host" if dev == "cpu" else "device", nb)
        return to(t, *rest, **kw) if rest or kw else t
    monkeypatch.setattr(offload, "device_kernel", lambda name, cuda=False: kernels[name])
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: sim.cur)
    monkeypatch.setattr(torch.cuda, "stream", sim.stream)
    everything = lambda device=None: sim.host_waits(join({}, sim.compute.vc, sim.copy.vc), "synchronize")
    monkeypatch.setattr(torch.cuda, "synchronize", everything)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: None)
    monkeypatch.setattr(torch.Tensor, "to", moved_to)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, **kw: sim.moved(t, "host"))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: t.clone())
    monkeypatch.setattr(SK, "CHECK_BOUNDS", False)
    with sim:
        yield sim


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_random(tmp_path_factory.mktemp("llama"), "llama", 1)


POLICIES = {"offload": {}, "infinigen": dict(budget=0.2, dense_layers=1), "h2o": dict(budget=0.2),
            "streaming": dict(budget=0.2), "oracle": dict(budget=0.2)}
POOL = dict(capacity=24)        # of 38 slots per sequence: the 30-token prompt's sequence evicts


def run(llama, name, monkeypatch, gather="device", record=True, forget=True, ignore=lambda ev, who: False,
        **kw):
    """Prefill, three plain decode steps, then (record) one more as a graph records it. Returns the sim."""
    m, prompts = llama
    tokens, valid = padded(prompts)
    cache = IG.make_cache(m, Policy(name, gather=gather, **POLICIES[name], **kw), len(prompts),
                          tokens.shape[1] + 8)
    tok = torch.full((len(prompts),), 5)
    with simulated(cache, monkeypatch, ignore=ignore) as sim:
        sim.cache = cache
        sim.made("host", valid)                           # generate keeps the prompt's mask on the host
        IG.prefill(m, cache, tokens, valid)
        for _ in range(3):
            IG.decode_one(m, cache, tok)
        if record:
            if forget:
                cache.store.forget_events()
            with sim.recording():
                IG.decode_one(m, cache, tok)
    return sim


@pytest.mark.parametrize("name", list(POLICIES))
def test_the_streams_never_race_and_a_step_can_be_recorded(llama, name, monkeypatch):
    sim = run(llama, name, monkeypatch)
    assert sim.copy.vc.get(sim.copy, 0) > 0, "nothing ran on the copy stream"
    assert not sim.races, sim.races[:3]
    assert not sim.errors, sim.errors[:3]


@pytest.mark.parametrize("gather", ["device", "host"])
def test_the_selection_runs_on_the_compute_stream(llama, gather, monkeypatch):
    """InfiniGen's selection reads the partial key cache on the compute stream, which writes it: the copy
    stream never touches it, with either gather, and nothing races. (Selecting on the copy stream, beside
    the layer's own work, was measured slower on an H200; the README's GPU section.)"""
    sim = run(llama, "infinigen", monkeypatch, gather=gather, record=gather == "device")
    who = {(str(s), k) for s, k, *_ in sim.acc[sim.cache.kpart[-1].untyped_storage().data_ptr()]}
    assert ("compute", "w") in who and ("compute", "r") in who and not {w for w in who if w[0] == "copy"}
    assert not sim.races and not sim.errors, (sim.races + sim.errors)[:3]


@pytest.mark.parametrize("pool", [False, True], ids=["unbounded", "pool"])
@pytest.mark.parametrize("gather", ["host", "device"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_the_host_and_the_streams_never_race(llama, name, gather, pool, monkeypatch):
    """The host gather and the bounded pool, whose host reads and writes pinned memory itself: no
    access of the host's is unordered with the streams'. (These steps are not recorded as graphs.)"""
    if pool and name == "oracle":
        pytest.skip("the oracle reads every key: it refuses a bounded pool")
    sim = run(llama, name, monkeypatch, gather=gather, record=False, **(POOL if pool else {}))
    touched = {who for who, *_ in sim.acc[sim.store]}                   # who read or wrote the store
    by_host = pool or (gather == "host" and name != "offload")      # offload alone copies whole blocks
    assert (sim.host in touched) == by_host, touched
    assert not sim.races, sim.races[:3]


RUNS = [(n, g, pool) for n in POLICIES for g in ("device", "host") for pool in (False, True)
        if not (pool and n == "oracle")]                         # 18 runs: the oracle refuses a pool
NEEDED = {   # tutorial chapter 17's table: a wait ignored by one party -> the runs that race
    ("ready", "compute"): lambda n, g, pool: True,
    ("freed", "copy"): lambda n, g, pool: n == "offload" and not pool,
    ("selection", "copy"): lambda n, g, _: g == "device" and n in ("oracle", "h2o", "streaming"),
    ("selection", "host"): lambda n, g, pool: g == "host" and (n != "offload" or pool),
    ("appended", "copy"): lambda n, g, pool: False,
    ("appended", "host"): lambda n, g, pool: False,
    ("ready", "host"): lambda n, g, pool: False}


@pytest.mark.parametrize("drop, who", list(NEEDED))
def test_each_wait_is_needed_where_the_tutorial_says(llama, drop, who, monkeypatch):
    """The check can fail: a wait ignored by `who` (a stream, or the host) leaves accesses unordered in
    exactly the runs chapter 17's table names: a buffer's `ready` and `freed`; with the host gather, the
    host's wait for the indices. The copy stream's wait for the selection's event orders the selections
    made in the layer itself (oracle, h2o, streaming; InfiniGen selects a layer ahead, and `freed` orders
    that). Ignoring `appended`
    leaves no race anywhere, nor does the host's wait on `ready` before it refills the staging rows:
    `freed` (device gather) or the host's wait for the selection orders them already, since the
    selection was queued after the last append and after the compute stream waited for that staging's
    last copy. A change that makes one of them needed fails here, and the table must change with it."""
    kept, plan, init = {}, IG.OffloadCache.plan, offload.KVStore.__init__

    def plan_and_keep(self, *a, **k):
        p = plan(self, *a, **k)
        if p and p[2] is not None:
            kept["selection"].append(p[2])
        return p

    def init_and_keep(self, *a, **k):
        init(self, *a, **k)
        kept["store"], kept["selection"] = self, []

    def ignore(ev, by):
        evs = kept["selection"] if drop == "selection" else getattr(kept["store"], drop)
        return str(by) == who and any(ev is e for e in evs)
    monkeypatch.setattr(IG.OffloadCache, "plan", plan_and_keep)
    monkeypatch.setattr(offload.KVStore, "__init__", init_and_keep)
    racing = {(n, g, pool): run(llama, n, monkeypatch, gather=g, record=False, ignore=ignore,
                                **(POOL if pool else {})).races for n, g, pool in RUNS}
    assert {r for r, races in racing.items() if races} == {r for r in RUNS if NEEDED[drop, who](*r)}
    assert all(any(f" {who} " in x for x in racing[r]) for r in RUNS if NEEDED[drop, who](*r))


def test_a_step_with_the_host_gather_cannot_be_recorded(llama, monkeypatch):
    """Why infinigen.replayable leaves the host gather out: the host waits for the indices in every step."""
    sim = run(llama, "infinigen", monkeypatch, gather="host")
    assert any("the host waits while a graph records" in e for e in sim.errors), sim.errors[:3]


def test_a_recording_without_forgetting_old_events_is_refused(llama, monkeypatch):
    sim = run(llama, "infinigen", monkeypatch, forget=False)
    assert any("before the recording" in e for e in sim.errors), sim.errors[:3]


def test_the_model_refuses_what_cuda_refuses():
    sim, x = Sim(), torch.zeros(4)
    Event.sim = sim
    with sim.recording():
        sim.copy.wait_stream(sim.compute)                          # joins the recording ...
        with sim.stream(sim.copy):
            sim.access([], [x])
        with sim.stream(Stream(sim, "other")):                     # never joined
            sim.access([x], [])
        Event().synchronize()
    assert sim.errors == ["work on other outside the recording", "the host waits while a graph records "
                          "(Event.synchronize)", "copy is not joined back at the end of the recording"]
    assert sim.races == ["r on other after w on copy with no order: None"]   # ... and never waited on
