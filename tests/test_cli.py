"""The command line, run as a user runs it: `python infinigen.py ...` in a subprocess.

Every error path prints exactly one line on stderr starting with "error:", exits non-zero and
shows no traceback. Each subprocess imports torch (seconds), so every case is started at once by
one module-scoped fixture and the tests only read the results.
"""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import default_model_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, os.path.join(ROOT, "infinigen.py")]
CUDA = torch.cuda.is_available()


def run_cli(args, env=()):
    return subprocess.run(CLI + list(args), cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **dict(env)))      # many at once: 1 each


# --- Fixtures: the tiny model folders, then every run at once
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders: llama (random, 64-token context, a word-level tokenizer), noweights (config.json
    only), gpt2 (unsupported model_type, a dummy safetensors file); long.txt (well over 64 tokens)."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    llama = root / "llama"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(llama)
    words = "[UNK] the quick brown fox jumps over lazy dog . hi name a color".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(llama / "tokenizer.json"))
    (root / "noweights").mkdir()
    shutil.copy(llama / "config.json", root / "noweights" / "config.json")
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10,
                                                           "n_embd": 8, "n_layer": 1, "n_head": 1}))
    save_file({"wte.weight": torch.zeros(10, 8)}, str(root / "gpt2" / "model.safetensors"))
    (root / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    shutil.copytree(llama, root / "nan")
    nan = {k: torch.full_like(t, float("nan")) for k, t in load_file(llama / "model.safetensors").items()}
    save_file(nan, str(root / "nan" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(llama, root / "short")            # config.json names one layer, the weights hold two
    hf = json.loads((llama / "config.json").read_text())
    (root / "short" / "config.json").write_text(json.dumps(hf | {"num_hidden_layers": 1}))
    return root


def error_cases(tiny):
    """name -> (arguments, a word the one error line must contain)."""
    cases = {
        "missing model folder": (["--model", "/nonexistent", "--prompt", "hi"], "/nonexistent"),
        "no safetensors": (["--model", str(tiny / "noweights"), "--prompt", "hi"], "safetensors"),
        "unsupported model_type": (["--model", str(tiny / "gpt2"), "--prompt", "hi"], "gpt2"),
        "prompt longer than context": (["--model", str(tiny / "llama"), "--no-chat", "--max-new-tokens", "1",
                                        "--prompt-file", str(tiny / "long.txt")], "context"),
        "max-new-tokens 0": (["--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens"),
        "temperature abc": (["--temperature", "abc", "--prompt", "hi"], "--temperature"),
        "policy nope": (["--policy", "nope", "--prompt", "hi"], "nope"),
        "budget 0": (["--budget", "0", "--prompt", "hi"], "budget"),
        "budget 1.5": (["--policy", "h2o", "--budget", "1.5", "--prompt", "hi"], "a whole token count"),
        "missing prompt file": (["--prompt-file", str(tiny / "absent.txt")], "absent.txt"),
        "prompt file is a folder": (["--prompt-file", str(tiny)], "not a regular file"),
        "empty prompt": (["--model", str(tiny / "llama"), "--no-chat", "--prompt", ""], "empty prompt"),
        "budget nan": (["--budget", "nan", "--prompt", "hi"], "budget"),
        "top-p 0": (["--top-p", "0", "--prompt", "hi"], "--top-p"),
        "negative alpha": (["--policy", "infinigen", "--alpha", "-1", "--prompt", "hi"], "alpha"),
        "negative capacity": (["--cpu-kv-capacity", "-1", "--prompt", "hi"], "capacity"),
        "prompt file named ''": (["--prompt-file", ""], "prompt file not found"),
        "calibration file named ''": (["--model", str(tiny / "llama"), "--policy", "infinigen", "--calib", "",
                                       "--prompt", "hi"], "calibration file not found"),
        "sampling NaN logits": (["--model", str(tiny / "nan"), "--temperature", "1", "--prompt", "hi",
                                 "--max-new-tokens", "2"], "logits are not finite"),
        "greedy on NaN logits": (["--model", str(tiny / "nan"), "--prompt", "hi", "--max-new-tokens", "2"],
                                 "logits are not finite"),
        "prompt and prompt file": (["--prompt", "hi", "--prompt-file", str(tiny / "long.txt")], "choose one"),
        "calibration for h2o": (["--policy", "h2o", "--calib", str(tiny / "long.txt"), "--prompt", "hi"],
                                "--calib calibrates InfiniGen's skew"),
        "eviction without a pool": (["--policy", "h2o", "--eviction", "lru", "--prompt", "hi"],
                                    "it needs --cpu-kv-capacity"),
        "a pool for full": (["--cpu-kv-capacity", "0.5", "--prompt", "hi"], "no CPU pool"),
        "recall of full": (["--measure-recall", "--prompt", "hi"], "not for --policy full"),
        "weights past config's layers": (["--model", str(tiny / "short"), "--prompt", "hi"], "have no place"),
    }
    if not CUDA:
        cases["cuda unavailable"] = (["--device", "cuda", "--prompt", "hi"], "CUDA")
        cases["copies timed on a CPU"] = (["--policy", "offload", "--time-copies", "--prompt", "hi"],
                                          "on a CPU every copy's wait is timed anyway")
        cases["kernel without its interpreter"] = (
            ["--model", str(tiny / "llama"), "--policy", "offload", "--gather", "device", "--prompt", "hi",
             "--max-new-tokens", "2", "--env", "TRITON_INTERPRET=0"], "TRITON_INTERPRET='0'")
    return cases


SUCCESS = {
    "full": ["--json", "--max-new-tokens", "8", "--prompt", "hi"],
    "infinigen": ["--json", "--max-new-tokens", "8", "--policy", "infinigen", "--prompt", "hi"],
    # batch > 1 decodes slowly on CPU (a (2, C) matmul is much slower than a (1, C) one): 2 tokens
    "batch": ["--json", "--max-new-tokens", "2", "--prompt", "hi", "--prompt", "Name a color."],
}


@pytest.fixture(scope="module")
def runs(tiny):
    jobs = {name: args for name, (args, _) in error_cases(tiny).items()}
    jobs["recall printed"] = ["--model", str(tiny / "llama"), "--no-chat", "--policy", "h2o", "--budget",
                              "0.5", "--dense-layers", "1", "--measure-recall", "--max-new-tokens", "3",
                              "--prompt", "the quick brown fox jumps"]
    jobs |= SUCCESS if default_model_available() else {}          # these run the built-in default model
    cut = lambda args: args.index("--env") if "--env" in args else len(args)     # noqa: E731 (our flag)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, a[:cut(a)], [e.split("=", 1) for e in a[cut(a) + 1:]])
                   for name, a in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# --- Error paths
ERROR_NAMES = ["missing model folder", "no safetensors", "unsupported model_type",
               "prompt longer than context", "max-new-tokens 0", "temperature abc", "policy nope", "budget 0",
               "missing prompt file", "prompt file is a folder", "empty prompt", "budget nan", "top-p 0",
               "negative alpha", "negative capacity", "cuda unavailable", "prompt file named ''",
               "calibration file named ''", "sampling NaN logits", "kernel without its interpreter",
               "greedy on NaN logits", "prompt and prompt file", "calibration for h2o",
               "eviction without a pool", "a pool for full", "recall of full", "weights past config's layers"]


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_is_one_line(name, runs, tiny):
    if name in ("cuda unavailable", "kernel without its interpreter") and CUDA:
        pytest.skip("CUDA is available here")
    r, word = runs[name], error_cases(tiny)[name][1]
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert word in lines[0], lines[0]


def test_a_closed_stdout_is_one_error_line_before_any_work():
    """`infinigen.py ... >&-` (and eval.py): the answer would go nowhere, so it is refused in one line on
    stderr before the model loads, not run for nothing with status 0 (nor a traceback)."""
    for argv in ([*CLI, "--budget", "0.2", "--prompt", "hi"], [sys.executable, "eval.py", "--text", "x.txt"]):
        r = subprocess.run(["bash", "-c", 'exec "$@" >&-', "_", *argv],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert r.stderr.startswith("error: standard output is closed"), r.stderr


def test_what_a_run_measured_is_printed_after_it(runs):
    """--measure-recall (and a pool, and copy waits) are shown without --json too, after the run."""
    r = runs["recall printed"]
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("[h2o] prefill"), lines
    assert any(ln.strip().startswith("recall 0.") for ln in lines), lines


# --- Success: --json
def check_stats(stats):
    for key in ("prefill_s", "decode_s", "tokens_per_s", "kv_bytes"):
        assert key in stats, key
    assert stats["prefill_s"] >= 0 and stats["decode_s"] >= 0 and stats["kv_bytes"] > 0


def check_tokens(tokens, text):
    assert isinstance(text, str)
    assert isinstance(tokens, list) and len(tokens) <= 8
    assert all(isinstance(t, int) for t in tokens)


def parse(r):
    if r is None:
        pytest.skip("the default model is not prepared and cannot be here")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout                     # one JSON object, nothing else on stdout
    return json.loads(lines[0])


def test_json_full(runs):
    out = parse(runs.get("full"))
    assert set(out) == {"text", "tokens", "stats"}
    check_tokens(out["tokens"], out["text"])
    check_stats(out["stats"])
    assert "h2d_bytes_per_step" not in out["stats"]       # nothing offloaded


def test_json_infinigen(runs):
    out = parse(runs.get("infinigen"))
    check_tokens(out["tokens"], out["text"])
    s = out["stats"]
    check_stats(s)
    frac = s["fetched_fraction_per_layer"]
    assert len(frac) == 30 and all(0 <= f <= 1 for f in frac)   # the default model has 30 layers
    assert frac[0] == frac[1] == 1.0                             # the dense layers fetch everything
    assert isinstance(s["h2d_bytes_per_step"], int) and s["h2d_bytes_per_step"] > 0


def test_json_two_prompts_give_lists(runs):
    out = parse(runs.get("batch"))
    assert isinstance(out["text"], list) and isinstance(out["tokens"], list)
    assert len(out["text"]) == len(out["tokens"]) == 2
    for text, tokens in zip(out["text"], out["tokens"]):
        check_tokens(tokens, text)
    check_stats(out["stats"])


# --- The --paper preset: the authors' settings; a flag given next to it wins
def test_paper_preset_sets_the_authors_choices_and_explicit_flags_win():
    import cli
    import eval as E
    import infinigen as I
    assert I.PAPER == dict(skew="svd", partial_ratio=0.2, alpha=4.0, budget=0.2, layer_budget="uniform",
                           head_count="mean")
    for build in (cli.build_parser, E.build_parser):
        plain = cli.parse_args(build(), [])
        assert (plain.skew, plain.partial_ratio, plain.alpha, plain.layer_budget, plain.head_count) == \
            (I.Policy().skew, I.Policy().partial_ratio, I.Policy().alpha, I.Policy().layer_budget, "own")
        paper = vars(cli.parse_args(build(), ["--paper"]))
        assert {k: paper[k] for k in I.PAPER} == I.PAPER and paper["policy"] == "infinigen"
        mixed = vars(cli.parse_args(build(), ["--budget", "0.1", "--paper", "--skew", "planes"]))
        assert mixed["budget"] == 0.1 and mixed["skew"] == "planes"          # given: they win
        assert mixed["alpha"] == 4.0 and mixed["partial_ratio"] == 0.2      # not given: the preset
        assert vars(cli.parse_args(build(), ["--paper", "--policy", "h2o"]))["policy"] == "h2o"
        assert vars(cli.parse_args(build(), ["--paper", "--head-count", "own"]))["head_count"] == "own"
    pol = I.Policy.paper(budget=0.1)
    got = (pol.name, pol.skew, pol.partial_ratio, pol.alpha, pol.budget, pol.layer_budget, pol.head_count)
    assert got == ("infinigen", "svd", 0.2, 4.0, 0.1, "uniform", "mean")
    flags = "--skew svd --partial-ratio 0.2 --alpha 4.0 --budget 0.2 --layer-budget uniform --head-count mean"
    assert flags in cli.PAPER_FLAGS
    assert cli.policy_of(cli.parse_args(cli.build_parser(), ["--paper"])).head_count == "mean"
    assert E.policy_from(cli.parse_args(E.build_parser(), ["--paper"])).head_count == "mean"


# --- A book as a prompt
def test_a_book_is_refused_from_its_beginning():
    """Far past the context, the prompt's head alone is tokenized before the error; a text whose head holds
    too few tokens (whitespace a word-level tokenizer drops) is tokenized whole and may fit."""
    import cli

    class Tok:
        seen = []

        def encode(self, text, chat=True):
            self.seen.append(len(text))
            return text.split()
    tok = Tok()
    with pytest.raises(ValueError, match="first 1024 characters alone exceed the model's context of 64"):
        cli.tokens(tok, "word " * 10**6, 64)
    assert tok.seen == [1024]
    assert cli.tokens(tok, " " * 5000 + "a b", 64) == ["a", "b"] and tok.seen[1:] == [1024, 5003]
    assert cli.tokens(tok, "a b", 64) == ["a", "b"] and tok.seen[3:] == [3]


# --- Out of memory
def test_out_of_memory_is_one_line(monkeypatch, capsys):
    """Host memory running out while loading or generating: torch's allocator, a failed mmap, or Python's
    MemoryError, all one line (and a failed CUDA graph recording); any other RuntimeError stays a bug."""
    import cli
    import model as M
    def raising(e):
        def load(*a, **kw):
            raise e
        monkeypatch.setattr(M, "load_with_tokenizer", load)
    for e in (MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to"),
              RuntimeError("unable to mmap 540 bytes from file <x>: Cannot allocate memory (12)")):
        raising(e)
        with pytest.raises(SystemExit) as ex:
            cli.main(["--prompt", "hi"])
        assert str(ex.value.code).startswith("error: out of host memory: "), ex.value.code
        assert len(str(ex.value.code).splitlines()) == 1
    from offload import GraphError
    raising(GraphError("recording a decode step as a CUDA graph failed (x\ny): try --no-graphs"))
    with pytest.raises(SystemExit) as ex:                           # a bug, but one with a way around it
        cli.main(["--prompt", "hi"])
    assert ex.value.code == "error: recording a decode step as a CUDA graph failed (x y): try --no-graphs"
    raising(RuntimeError("CUDA error: device-side assert triggered"))
    with pytest.raises(RuntimeError, match="device-side assert"):
        cli.main(["--prompt", "hi"])


def test_eviction_needs_a_pool_in_eval_too():
    import cli
    import eval as E
    from infinigen import Policy
    parse = lambda *argv: cli.parse_args(E.build_parser(), list(argv))        # noqa: E731
    with pytest.raises(ValueError, match="it needs --cpu-kv-capacity"):
        E.policy_from(parse("--eviction", "lru"))
    assert E.policy_from(parse("--eviction", "lru", "--cpu-kv-capacity", "0.5")).eviction == "lru"
    assert E.policy_from(parse()).eviction == Policy().eviction


def test_study_refuses_what_it_does_not_read():
    """eval.py --study sets each part's policies itself: --budget and the like are refused, not ignored."""
    import eval as E
    for flags in (["--budget", "0.3"], ["--policy", "h2o"], ["--dense-layers", "3"],
                  ["--cpu-kv-capacity", "0.5", "--eviction", "lru"], ["--eviction", "lru"]):
        with pytest.raises(ValueError, match=f"{flags[0]} is not read by --study"):
            E.check_only(E.parse(["--study", *flags]))
    for flags in ([], ["--paper"], ["--alpha", "2"], ["--only", "pool"]):
        E.check_only(E.parse(["--study", *flags]))
    E.check_only(E.parse(["--budget", "0.3"]))                                       # a single run reads it
    for argv, flag, mode in ((["--study", "--budget", "0.1"], "--budget", "study"),   # the default value too
                             (["--passkey", "--decode", "512"], "--decode", "passkey"),
                             (["--report", "--windows", "1"], "--windows", "report"),
                             (["--report", "--policy", "infinigen"], "--policy", "report")):
        with pytest.raises(ValueError, match=f"{flag} is not read by --{mode}"):
            E.check_only(E.parse(argv))
