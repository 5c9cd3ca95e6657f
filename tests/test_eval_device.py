"""eval.py --device: the accuracy study runs on a GPU and gives the CPU's numbers.

One window of prompts/demo.txt (384 tokens, the last 128 decoded with the policy), through eval.main as a
user runs it, on the CPU and on CUDA, float32 on both. Tolerances: KL(full || policy) within 1e-3
absolute, top-1 agreement equal within one position, the full-attention reference's perplexity within
1e-3 relative; passkey at 1k within one depth of three. Runs only where CUDA is.
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
from helpers import default_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "prompts", "demo.txt")


def eval_json(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        E.main([*argv, "--json"])
    return json.loads(out.getvalue())


def window(policy, device, folder):
    return eval_json("--model", folder, "--text", TEXT, "--context", "384", "--decode", "128",
                     "--policy", policy, "--budget", "0.1", "--device", device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["full", "infinigen", "h2o", "oracle"])
def test_cpu_and_cuda_agree_on_a_window(policy):
    folder = default_model_folder()
    cpu, cuda = window(policy, "cpu", folder), window(policy, "cuda", folder)
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
