"""results/gpu_check.sh, the one script a GPU session runs (its device time is short: a broken script
wastes it). Here it runs on the CPU with a stand-in for python that records its arguments and sleeps as
told, so what is checked is the script's own logic: each part's time limit within the call's budget,
parts skipped when too little is left, the host gather when the kernel's smoke test fails, and every log
packed into the one archive the device tool brings back."""
import os
import shutil
import subprocess
import tarfile
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(not shutil.which("timeout") or not shutil.which("tar"),
                                reason="needs timeout and tar")

FAKE_PY = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
    -)  cat > /dev/null                                     # the smoke test, read from stdin
        [ "$SMOKE_OK" = 1 ] && echo "the Triton kernels read and write registered host memory:" \
            "the device gather runs"
        [ "$SMOKE_OK" = 1 ] ;;
    *"--suite gpu"*) exec sleep "$PART_S" ;;
    *--collect-only*) [ -n "$IDS" ] && cat "$IDS"; echo "2 warnings, 9 tests collected" ;;
    "-m pytest"*) printf '%s\n' "$@" >"$(mktemp "$CALLS.args.XXXXXX")"   # each argument on a line
        echo "stand-in output" ;;
    *) echo "stand-in output" ;;
esac
"""


def gpu_check(tmp_path, parts, budget, part_s, smoke_ok, **env):
    repo, out, logs = tmp_path / "repo", tmp_path / "out", tmp_path / "logs"
    os.makedirs(repo / "results")
    os.makedirs(repo / "tests")
    for name in "abcdef":                                 # test files for the `suite` part to deal out
        (repo / "tests" / f"test_{name}.py").write_text("")
    shutil.copy(os.path.join(ROOT, "results", "gpu_check.sh"), repo / "results")
    py = tmp_path / "python3"
    py.write_text(FAKE_PY)
    py.chmod(0o755)
    env = {**os.environ, "PY": str(py), "OUT": str(out), "LOGS": str(logs), "BUDGET_S": str(budget),
           "CALLS": str(tmp_path / "calls"), "PART_S": str(part_s), "SMOKE_OK": str(int(smoke_ok)),
           "PROCS": "16", "SUITE_S": "240", **env}             # (not those of a script that runs us)
    t = time.monotonic()
    run = subprocess.run(["bash", str(repo / "results" / "gpu_check.sh"), *parts], env=env,
                         capture_output=True, text=True, timeout=budget + 60)
    with tarfile.open(out / "gpu-check.tgz") as tar:
        packed = {os.path.basename(n): tar.extractfile(n).read().decode() for n in tar.getnames()
                  if tar.getmember(n).isfile()}
    calls = (tmp_path / "calls").read_text().splitlines()
    return run, time.monotonic() - t, packed, calls


def test_a_part_that_runs_long_is_cut_at_the_budget_and_the_rest_skipped(tmp_path):
    run, took, packed, calls = gpu_check(tmp_path, ["gather", "7b", "timeline"], budget=36, part_s=300,
                                         smoke_ok=False)
    assert run.returncode == 0, run.stderr
    assert took < 36 + 5, f"the call took {took:.0f} s of a 36 s budget"
    assert {"machine.log", "smoke.log", "gather.log", "7b.log", "timeline.log"} <= set(packed)
    assert "the benchmark parts use --gather host" in packed["smoke.log"]
    bench = [c for c in calls if c.startswith("bench.py")]
    assert bench[0] == "bench.py --gather host --suite gather"        # the kernel cannot run: the host's
    assert bench[1].startswith("bench.py --gather host --suite gpu --models 7b --shapes 8x4096")
    assert len(bench) == 2, "the timeline ran with no time left"
    assert packed["7b.log"].splitlines()[-1].startswith("exit status 124")       # cut at its limit
    assert "timeline: skipped" in packed["timeline.log"]


def test_with_a_working_kernel_every_part_runs_with_the_device_gather(tmp_path):
    run, took, packed, calls = gpu_check(tmp_path, ["smollm2", "tests"], budget=570, part_s=0, smoke_ok=True)
    assert run.returncode == 0, run.stderr
    assert took < 10, f"{took:.0f} s: the call outlived its parts (a packer's sleep held its output?)"
    bench = [c for c in calls if c.startswith("bench.py")]
    assert [c.split(" --policies")[0] for c in bench] == [
        "bench.py --suite gpu --models smollm2 --shapes 32x4096",
        "bench.py --suite gpu --models smollm2 --shapes 32x4096 --no-graphs"]
    assert any(c.startswith("-m pytest") and "-m cuda" in c for c in calls)
    assert "the device gather runs" in packed["smoke.log"]
    for part in ("smollm2", "smollm2-no-graphs", "tests"):
        assert "exit status 0 after" in packed[f"{part}.log"], packed[f"{part}.log"]
    assert packed["tests.log"].splitlines()[-1] == "stand-in output"     # the stamp: device, torch, date


def test_the_profile_and_grid_parts_and_the_suite_in_parallel_processes(tmp_path):
    run, took, packed, calls = gpu_check(tmp_path, ["profile", "grid", "suite"], budget=570, part_s=0,
                                         smoke_ok=True)
    assert run.returncode == 0, run.stderr
    bench = [c for c in calls if c.startswith("bench.py")]
    assert [c.split(" --models ")[0] for c in bench[:2]] == ["bench.py --suite profile"] * 2
    assert [c.split("--gather-per-sm ")[1].split()[0] for c in bench[2:]] == ["0", "0", "1"]
    assert [c.split(" --models ")[1].split()[0] for c in bench] == ["smollm2", "7b", "7b", "smollm2", "7b"]
    suites = [c for c in calls if c.startswith("-m pytest -v -rfE")]
    files = sorted(f for c in suites for f in c.split() if f.startswith("tests/test_"))
    assert len(suites) == 6 and files == [f"tests/test_{n}.py" for n in "abcdef"]   # none collected (the
    assert all(c.count("tests/test_") == 1 for c in suites)                         # stand-in): by file
    assert packed["suite.log"].count("exit status 0 after") == 6
    _, _, packed, calls = gpu_check(tmp_path / "host", ["grid"], budget=570, part_s=0, smoke_ok=False)
    assert "grid: skipped" in packed["grid.log"] and not [c for c in calls if "--gather-per-sm" in c]


def test_the_suite_deals_its_tests_one_by_one(tmp_path):
    """Dealt by test, not by file (one long file would decide the part's time); an id with spaces (a
    parametrization's) reaches pytest as one argument; lines that are not test ids are left out; a file
    that failed to import is run whole (its error in a process's log) and named in suite.log; the call's
    output (the device tool shows its tail) shows the start of each process's list only."""
    ids = [f"tests/test_{f}.py::test_{i}_{'long' * 20}" for f in "ab" for i in range(4)]
    ids += ["tests/test_b.py::t[a b]"]
    noise = ["tests/test_a.py:3: PytestWarning: not an id", "ERROR tests/test_c.py"]
    (tmp_path / "ids").write_text("\n".join(ids[:5] + noise + ids[5:]) + "\n")
    run, _, packed, calls = gpu_check(tmp_path, ["suite"], budget=570, part_s=0, smoke_ok=True,
                                      IDS=str(tmp_path / "ids"), PROCS="4")
    assert run.returncode == 0, run.stderr
    dealt = [(tmp_path / f).read_text().splitlines() for f in sorted(os.listdir(tmp_path))
             if f.startswith("calls.args.")]
    dealt = [[a for a in args if a.startswith("tests/")] for args in dealt]
    ids += ["tests/test_c.py"]
    assert sorted(a for args in dealt for a in args) == sorted(ids)         # each once, the spaced one whole
    assert sorted(len(args) for args in dealt) == [2, 2, 3, 3]              # 10 to 4 processes
    assert packed["suite.log"].count("exit status 0 after") == 4
    assert "collect: ERROR tests/test_c.py" in packed["suite.log"].splitlines()
    assert "ERROR tests/test_c.py" in packed["suite-collect.log"]
    assert max(map(len, run.stdout.splitlines())) < 300, "the call's output shows each list of tests whole"


def test_the_slots_part_measures_every_selection_in_one_run(tmp_path):
    """InfiniGen 0.1 with --slots torch, kernel and fused on SmolLM2's shape, torch and fused on the 7B shape
    (side by side, so one machine measures them all), then a profile of the fused speculation; each run a
    log of its own."""
    run, _, packed, calls = gpu_check(tmp_path, ["slots"], budget=570, part_s=0, smoke_ok=True)
    assert run.returncode == 0, run.stderr
    bench = [c for c in calls if c.startswith("bench.py")]
    assert [(c.split(" --models ")[1].split()[0], c.split("--slots ")[1].split()[0]) for c in bench] == [
        ("smollm2", "torch"), ("smollm2", "kernel"), ("smollm2", "fused"), ("7b", "torch"), ("7b", "fused"),
        ("smollm2", "fused")]
    assert all(c.endswith("--policies infinigen:0.1") for c in bench[:5]) and "--suite profile" in bench[5]
    for log in ("slots-smollm2-torch", "slots-smollm2-kernel", "slots-smollm2-fused", "slots-7b-torch",
                "slots-7b-fused", "profile-slots"):
        assert "exit status 0 after" in packed[f"{log}.log"], log


def test_an_unknown_part_is_refused(tmp_path):
    run, _, _, _ = gpu_check(tmp_path, ["gpu"], budget=60, part_s=0, smoke_ok=True)
    assert run.returncode == 2 and "unknown part gpu" in run.stdout
