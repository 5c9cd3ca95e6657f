"""Shared test helpers."""
import torch


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
