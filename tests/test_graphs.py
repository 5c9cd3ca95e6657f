"""Decode steps a CUDA graph can replay (infinigen.Graphed), checked on the CPU where CI runs.

A graph records a step's kernels once, with their shapes, the addresses they read and write, and every
number the host passed them; replaying it is right only if a plain step would launch exactly that
again. The CPU twin records every tensor operation of two consecutive decode steps and requires the
two records to be identical: the same operations, shapes and constants, the same addresses for every
tensor that lives across steps (the cache's buffers), and no operation that reads a value on the host.
The host's part of a step (Cache.enter / leave, the ledger's byte counts) is checked apart: a replay's
bookkeeping must leave the host where a plain step leaves it. On a GPU, graphs and plain steps give
the same tokens.
"""
import copy
import dataclasses
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import infinigen as IG
import model
import offload
import skew as SK
from infinigen import Policy
from test_policies import hf_random, padded, torch_gather

CUDA = torch.cuda.is_available()
HOST_READS = ("_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero")


def torch_put(src, at, dst):  # kernel.put_rows in plain tensor operations
    dst.index_copy_(0, at, src)


class StepRecord(TorchDispatchMode):
    """Every tensor operation: its name, the shape, strides and type of each tensor argument, its other
    arguments, and the address of each tensor whose memory was not made in this step."""
    def __init__(self):
        super().__init__()
        self.ops, self.made = [], set()

    def describe(self, x):
        if isinstance(x, torch.Tensor):
            mine = x.untyped_storage().data_ptr() in self.made
            return (tuple(x.shape), x.stride(), x.dtype, "temporary" if mine else x.data_ptr())
        if isinstance(x, (list, tuple)):
            return tuple(self.describe(y) for y in x)
        return x if isinstance(x, (int, float, bool, str, type(None))) else str(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), self.describe(args), self.describe(sorted(kwargs.items()))))
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made.add(t.untyped_storage().data_ptr())
        return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_random(tmp_path_factory.mktemp("llama"), "llama", 1)


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    return hf_random(tmp_path_factory.mktemp("opt"), "opt", 0)


def records(m, prompts, pol, monkeypatch, steps=2):
    """The operations of `steps` consecutive decode steps (after two plain ones), each a StepRecord."""
    monkeypatch.setattr(offload, "device_kernel", {"gather_rows": torch_gather, "put_rows": torch_put}.get)
    monkeypatch.setattr(SK, "CHECK_BOUNDS", False)                 # the CPU's own check reads a count
    tokens, valid = padded(prompts)
    cache = IG.make_cache(m, pol, len(prompts), tokens.shape[1] + 8)
    IG.prefill(m, cache, tokens, valid)
    out, tok = [], torch.zeros(len(prompts), dtype=torch.long)     # the input as a graph has it: one buffer
    for i in range(2 + steps):
        tok.fill_(5 + i)
        rec = StepRecord()
        with rec:
            IG.decode_one(m, cache, tok)
        out.append(rec)
    return cache, out[2:]


REPLAYABLE = {"full": {}, "infinigen": dict(budget=0.2), "h2o": dict(budget=0.2),
              "streaming": dict(budget=0.2), "oracle": dict(budget=0.2),
              "infinigen-alpha": dict(budget=0.3, alpha=2.0)}
NOT = {"offload": {}, "infinigen-host": dict(budget=0.2, gather="host"),
       "infinigen-pool": dict(budget=0.2, capacity=20.0),
       "infinigen-recall": dict(budget=0.2, measure_recall=True)}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("name", list(REPLAYABLE))
def test_a_decode_step_is_the_same_at_every_step(arch, name, request, monkeypatch):
    m, prompts = request.getfixturevalue(arch)
    pol = Policy(name.split("-")[0], gather="device", **REPLAYABLE[name])
    cache, (a, b) = records(m, prompts, pol, monkeypatch)
    assert IG.replayable(cache)
    assert not [op for op in a.ops if any(r in op[0] for r in HOST_READS)], "a step reads a value on the host"
    assert len(a.ops) == len(b.ops)
    for i, (x, y) in enumerate(zip(a.ops, b.ops)):
        assert x == y, f"operation {i} differs between two decode steps:\n{x}\n{y}"


def test_no_graphs_is_honoured_by_every_policy():
    """--no-graphs (Policy.graphs False) turns graphs off for full too, whose cache carries no policy
    (graphable read the cache's and took the default, graphs on, for full)."""
    on_cuda = types.SimpleNamespace(valid=types.SimpleNamespace(is_cuda=True))     # all it reads of full
    assert IG.graphable(on_cuda, Policy("full"))
    assert not IG.graphable(on_cuda, Policy("full", graphs=False))


@pytest.mark.parametrize("name", list(NOT))
def test_steps_that_cannot_be_replayed_are_known(llama, name, monkeypatch):
    """The record tells these apart (so the check above can fail), and `replayable` says no."""
    m, prompts = llama
    kw = {"gather": "device", **NOT[name]}
    cache, (a, b) = records(m, prompts, Policy(name.split("-")[0], **kw), monkeypatch)
    assert not IG.replayable(cache)
    reads = [op for op in a.ops if any(r in op[0] for r in HOST_READS)]
    assert reads or a.ops != b.ops


# --- The host's part of a replayed step
def host_state(x):
    """What the host keeps for a cache: numbers, strings, lists, arrays, recursively through the store,
    the ledger and the pool; tensors, events, the model, the settings and the CPU's copy time left out."""
    if isinstance(x, (int, float, str, bool, type(None))):
        return x
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [host_state(y) for y in x]
    if isinstance(x, dict):
        return {k: host_state(v) for k, v in x.items()}
    if isinstance(x, (model.Cache, offload.KVStore, offload.Ledger, offload.Pool)):
        skip = ("model", "pol", "cfg", "wait_s", "decode_wait_s")             # the timings differ
        return {k: host_state(v) for k, v in vars(x).items() if k not in skip}
    return type(x).__name__


class FakeGraph:  # torch.cuda.CUDAGraph on a CPU: recording runs the step, a replay does nothing
    def replay(self):
        pass


@pytest.mark.parametrize("name", ["full", "infinigen", "h2o"])
def test_a_replay_leaves_the_host_where_a_plain_step_does(llama, name, monkeypatch):
    m, prompts = llama
    monkeypatch.setattr(offload, "device_kernel", {"gather_rows": torch_gather, "put_rows": torch_put}.get)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: torch.no_grad())
    pol = Policy(name, budget=0.2, gather="device")
    tokens, valid = padded(prompts)
    plain, graphed = [IG.make_cache(m, pol, len(prompts), tokens.shape[1] + 8) for _ in range(2)]
    for c in (plain, graphed):
        IG.prefill(m, c, tokens, valid)
    step = IG.Graphed(m, graphed)
    for i in range(4):                     # plain (warm), recorded (then replayed), replayed, replayed
        tok = torch.full((len(prompts),), 5 + i)
        want = IG.decode_one(m, plain, tok)
        got = step(tok)
        if i < 2:                          # on a CPU the recording ran the step: the same logits
            assert torch.equal(got, want)
        assert host_state(graphed) == host_state(plain), f"host state after step {i}"
    assert plain.t0 == graphed.t0 == tokens.shape[1] + 4


def test_after_each_replay_one_event_stands_for_the_graphs_events(llama, monkeypatch):
    """The events a recording leaves in the store belong to the graph: a wait on them outside it is an
    error on CUDA. Before recording the store forgets its events; after every replay (the recording's own
    included) one event recorded after the replay takes the place of each."""
    m, prompts = llama
    monkeypatch.setattr(offload, "device_kernel", {"gather_rows": torch_gather, "put_rows": torch_put}.get)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: torch.no_grad())
    tokens, valid = padded(prompts)
    pol = Policy("infinigen", budget=0.2, gather="device")
    cache = IG.make_cache(m, pol, len(prompts), tokens.shape[1] + 8)
    IG.prefill(m, cache, tokens, valid)
    calls, forget = [], cache.store.forget_events
    monkeypatch.setattr(cache.store, "forget_events", lambda replayed=False: (calls.append(replayed),
                                                                              forget(replayed)))
    step = IG.Graphed(m, cache)
    for i in range(4):                     # plain (warm), recorded and replayed, replayed, replayed
        step(torch.full((len(prompts),), 5 + i))
        assert calls == [[], [False, True], [True], [True]][i], f"step {i}: {calls}"
        calls.clear()
    marks = iter(range(100))              # what CUDA does: the store's events all become the replay's one
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(
        record_event=lambda: f"event {next(marks)}"))
    monkeypatch.setattr(cache.store, "cuda", True)
    forget(replayed=True)
    st = cache.store
    assert st.appended == [st.ready[0]] * st.L and st.ready == st.freed == ["event 0"] * 2
    forget()
    assert st.appended == [None] * st.L and st.ready == st.freed == [None] * 2


def test_a_recording_that_fails_says_so_in_one_error(llama, monkeypatch):
    """CUDA refusing to record a step (an operation a graph cannot hold) is a bug of ours, reported as a
    GraphError naming --no-graphs (the command line prints it as one line); out of memory stays that."""
    m, prompts = llama
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    refused = RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    oom = torch.OutOfMemoryError("CUDA out of memory")
    for e, want in [(refused, offload.GraphError), (oom, torch.OutOfMemoryError)]:
        def refusing(graph, e=e):
            raise e
        monkeypatch.setattr(torch.cuda, "graph", refusing)
        tokens, valid = padded(prompts)
        cache = IG.make_cache(m, Policy("full"), len(prompts), tokens.shape[1] + 8)
        IG.prefill(m, cache, tokens, valid)
        step, tok = IG.Graphed(m, cache), torch.full((len(prompts),), 5)
        step(tok)                                                       # the plain first step
        with pytest.raises(want) as got:
            step(tok)
        assert type(got.value) is want
        if want is offload.GraphError:
            assert "--no-graphs" in str(got.value) and "operation not permitted" in str(got.value)
            assert got.value.__cause__ is e


# --- On a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(REPLAYABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_steps_equal_plain_steps(llama, name, dtype, tmp_path):
    pytest.importorskip("triton")
    m, prompts = llama
    m = copy.deepcopy(m).to("cuda", dtype)
    pol = Policy(name.split("-")[0], gather="device", **REPLAYABLE[name])
    runs = [IG.generate(m, prompts, dataclasses.replace(pol, graphs=g), max_new=12) for g in (False, True)]
    (ids0, s0), (ids1, s1) = runs
    assert not s0["cuda_graph"] and s1["cuda_graph"]
    assert ids0 == ids1
    for key in ("h2d_bytes_per_step", "fetched_fraction_per_layer"):
        assert s0.get(key) == s1.get(key), key


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_plain_steps_may_follow_replays(llama):
    """A step outside the graph after replays waits on the replay's event, not on an event recorded while
    recording (CUDA refuses that wait); it computes what a cache that never replayed computes."""
    pytest.importorskip("triton")
    m, prompts = llama
    m = copy.deepcopy(m).to("cuda")
    pol = Policy("oracle", budget=0.2, gather="device")
    tokens, valid = padded(prompts)                                       # valid stays on the host
    tokens = tokens.cuda()
    plain, graphed = [IG.make_cache(m, pol, len(prompts), tokens.shape[1] + 8) for _ in range(2)]
    for c in (plain, graphed):
        IG.prefill(m, c, tokens, valid)
    step = IG.Graphed(m, graphed)
    for i in range(4):
        tok = torch.full((len(prompts),), 5 + i, device="cuda")
        IG.decode_one(m, plain, tok)
        step(tok)
    tok = torch.full((len(prompts),), 9, device="cuda")
    assert torch.equal(IG.decode_one(m, graphed, tok), IG.decode_one(m, plain, tok))
    cpu = torch.device("cpu")
    for layer in range(graphed.first, m.cfg.n_layers):
        assert torch.equal(graphed.store.keys(layer, graphed.t0, cpu), plain.store.keys(layer, plain.t0, cpu))


def test_h2o_evicts_only_past_tokens(llama):
    """A decode step reads every slot, so H2O's eviction must touch only slots that hold past tokens:
    a slot not yet written stays alive for the token that will fill it."""
    m, prompts = llama
    tokens, valid = padded(prompts)
    cache = IG.make_cache(m, Policy("h2o", budget=0.2), len(prompts), tokens.shape[1] + 8)
    IG.prefill(m, cache, tokens, valid)
    for i in range(4):
        IG.decode_one(m, cache, torch.full((len(prompts),), 5 + i))
        assert cache.alive[cache.first:, :, :, cache.t0:].all()
        assert not cache.alive[cache.first:, :, :, :cache.t0 - 1].all()      # while past tokens go
