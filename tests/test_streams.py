"""The copy stream's ordering, checked on the CPU: no race between the two streams, and a decode step a
CUDA graph can record.

On a GPU, KVStore.fetch copies on its own stream while the compute stream runs the layers; events are
all that orders them. A missing wait gives no error there, only wrong numbers now and then. Here the
same code runs against a model of CUDA's semantics: streams and events are stand-ins, every tensor
operation is logged on the stream it was issued to (a TorchDispatchMode; the kernels by what they read
and write), and vector clocks give "happens before". Every write must happen after the earlier reads and
writes of the same bytes on other streams, every read after the last write. While a graph records, a
stream may wait only on events recorded inside the recording, every stream that joined must be joined
back at its end, no stream outside it may work, and the host may not wait. The device gather only: the
host gather's own work runs on the host, which this model does not follow.
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
from test_graphs import torch_put
from test_policies import hf_random, padded, torch_gather


# --- A model of CUDA streams and events
class Stream:
    def __init__(self, sim, name):
        self.sim, self.name, self.vc = sim, name, {}

    def wait_event(self, ev):
        self.sim.wait(self, ev)

    def wait_stream(self, other):
        ev = Event()
        ev.record(other)
        self.wait_event(ev)

    def __repr__(self):
        return self.name


class Event:
    sim = None                                           # the simulation in force

    def __init__(self, enable_timing=False):
        self.vc, self.captured = None, False

    def record(self, stream=None):
        self.sim.record(self, stream or self.sim.cur)

    def synchronize(self):
        self.sim.host_wait("Event.synchronize")


class Sim(TorchDispatchMode):
    """Streams, events and every tensor access. races: conflicting accesses with no order between them;
    errors: what CUDA would refuse while a graph records."""
    def __init__(self, ignore=lambda ev: False):
        super().__init__()
        self.compute, self.copy = Stream(self, "compute"), Stream(self, "copy")
        self.cur, self.ignore, self.races, self.errors = self.compute, ignore, [], []
        self.acc = {}                                    # storage -> {(stream, kind, lo, hi): clock}
        self.capturing = None                            # the streams in the recording, or None
        self.op = None                                   # the operation being logged

    # streams, events, the host
    def tick(self, s):
        if self.capturing is not None and s not in self.capturing:
            self.errors.append(f"work on {s} outside the recording")
        s.vc[s] = s.vc.get(s, 0) + 1
        return s.vc

    def record(self, ev, s):
        self.tick(s)
        ev.vc, ev.captured = dict(s.vc), self.capturing is not None

    def wait(self, s, ev):
        if ev.vc is None or self.ignore(ev):             # never recorded: CUDA waits for nothing
            return
        if self.capturing is not None:
            if not ev.captured:
                self.errors.append(f"{s} waits on an event recorded before the recording")
            self.capturing.add(s)
        for k, c in ev.vc.items():
            s.vc[k] = max(s.vc.get(k, 0), c)

    def host_wait(self, what):
        if self.capturing is not None:
            self.errors.append(f"the host waits while a graph records ({what})")

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

    # accesses
    def access(self, reads, writes, fresh=()):
        s = self.cur
        vc = self.tick(s)
        for t, kind in [(t, "r") for t in reads] + [(t, "w") for t in writes]:
            if t.numel() == 0:
                continue
            base, lo = t.untyped_storage().data_ptr(), t.data_ptr()
            hi = lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
            if any(t is f for f in fresh):
                self.acc[base] = {}                      # new memory: nothing before it
            book = self.acc.setdefault(base, {})
            for (s2, k2, lo2, hi2), c in book.items():
                if s2 is not s and lo2 < hi and lo < hi2 and "w" in (kind, k2) and vc.get(s2, 0) < c:
                    self.races.append(f"{kind} on {s} after {k2} on {s2} with no order: {self.op}")
            book[(s, kind, lo, hi)] = vc[s]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema, self.op = func._schema, str(func)
        written = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
        if any(r.alias_info is not None for r in schema.returns) and not any(written):
            return out                                   # a view: no memory is touched
        tensors = lambda xs: [t for t in tree_leaves(xs) if isinstance(t, torch.Tensor)]
        named = dict(zip([a.name for a in schema.arguments], args)) | kwargs
        writes = tensors([named.get(a.name) for a, w in zip(schema.arguments, written) if w])
        outs = [t for t in tensors(out) if not any(t is w for w in writes)]
        self.access(tensors((args, kwargs)), writes + outs, fresh=outs)
        return out

    def kernel(self, fn, reads):                # a kernel: reads its first arguments, writes its last
        def run(*args):
            self.op = fn.__name__
            self.access(args[:reads], args[-1:])
            with _disable_current_modes():
                fn(*args)
        return run


@contextlib.contextmanager
def simulated(store, monkeypatch, **kw):
    """Run a cache's steps as if on CUDA: its store copies on the simulated copy stream."""
    sim = Sim(**kw)
    Event.sim = sim
    store.cuda, store.stream = True, sim.copy
    kernels = {"gather_rows": sim.kernel(torch_gather, 3), "put_rows": sim.kernel(torch_put, 2)}
    monkeypatch.setattr(offload, "device_kernel", lambda name, cuda=False: kernels[name])
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: sim.cur)
    monkeypatch.setattr(torch.cuda, "stream", sim.stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: sim.host_wait("synchronize"))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: None)
    monkeypatch.setattr(SK, "CHECK_BOUNDS", False)
    with sim:
        yield sim


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_random(tmp_path_factory.mktemp("llama"), "llama", 1)


POLICIES = {"offload": {}, "infinigen": dict(budget=0.2, dense_layers=1), "h2o": dict(budget=0.2),
            "streaming": dict(budget=0.2), "oracle": dict(budget=0.2)}


def run(llama, name, monkeypatch, record=True, forget=True, **kw):
    """Prefill, three plain decode steps, then (record) one more as a graph records it. Returns the sim."""
    m, prompts = llama
    tokens, valid = padded(prompts)
    cache = IG.make_cache(m, Policy(name, gather="device", **POLICIES[name]), len(prompts),
                          tokens.shape[1] + 8)
    tok = torch.full((len(prompts),), 5)
    with simulated(cache.store, monkeypatch, **kw) as sim:
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


@pytest.mark.parametrize("drop", ["ready", "freed", "selection"])
def test_a_missing_wait_is_a_race(llama, drop, monkeypatch):
    """The check can fail: each kind of event, ignored, leaves accesses unordered: a buffer's `ready` and
    `freed`, and the event after a selection made in the layer itself (oracle, h2o, streaming; InfiniGen
    selects a layer ahead, and `freed` orders that). Ignoring `appended` leaves no race with the device
    gather: `freed` already orders a fetch after the compute stream's last append."""
    state, plan, init = {}, IG.OffloadCache.plan, offload.KVStore.__init__

    def plan_without_event(self, *a, **k):
        p = plan(self, *a, **k)
        return p and (p[0], p[1], None)

    def init_and_keep(self, *a, **k):
        init(self, *a, **k)
        state["store"] = self

    def ignore(ev):
        return "store" in state and any(ev is e for e in getattr(state["store"], drop))
    if drop == "selection":
        monkeypatch.setattr(IG.OffloadCache, "plan", plan_without_event)
    else:
        monkeypatch.setattr(offload.KVStore, "__init__", init_and_keep)
    sim = run(llama, "oracle" if drop == "selection" else "offload", monkeypatch, record=False, ignore=ignore)
    assert sim.races


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
