"""OPT and Llama decoders written directly in torch, loaded from safetensors.

Shapes: B batch, T new tokens this step, S cache slots, C hidden size, H query heads,
Hkv key/value heads, G = H // Hkv query heads per KV head, d head dim, V vocabulary.
Attention never owns its past: it hands q, k, v to a cache object (the policy) and gets the
attention output back, so every policy of the engine runs this one model.
"""
import json
import math
import os
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(Exception):
    """A user-facing problem with a model folder or config: printed as one line."""


def read_json(path):
    """A JSON object from a file, or a ModelError naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise ModelError(f"no {os.path.basename(path)} in {os.path.dirname(path) or '.'}"
                         if not os.path.exists(path) else f"{path} is not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:                  # JSONDecodeError and UnicodeDecodeError included
        raise ModelError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


class Need(dict):  # config.json's fields: a missing one is named, not a KeyError
    def __missing__(self, key):
        raise ModelError(f"config.json lacks {key!r}")


# --- Config
HF_KEYS = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",  # for messages
               n_kv_heads="num_key_value_heads", embed_dim="word_embed_proj_dim", attn_bias="attention_bias",
               ffn_dim="intermediate_size (ffn_dim)", pre_norm="do_layer_norm_before",
               max_seq_len="max_position_embeddings", tie_embeddings="tie_word_embeddings")
VARIANT = dict(llama=dict(hidden_act="silu"), opt=dict(activation_function="relu", enable_bias=True,
               layer_norm_elementwise_affine=True, _remove_final_layer_norm=False))  # what we implement
LLAMA3 = dict(factor=None, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@dataclass
class Config:
    arch: str                      # "llama" or "opt"
    vocab_size: int
    dim: int                       # C
    n_layers: int                  # L
    n_heads: int                   # H
    n_kv_heads: int                # Hkv (GQA when < H)
    ffn_dim: int
    max_seq_len: int               # the context the model was trained for
    head_dim: int = 0              # d; 0 = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # llama3 parameters, or {}
    tie_embeddings: bool = False
    attn_bias: bool = False        # q, k, v, o biases (always on for OPT)
    mlp_bias: bool = False
    embed_dim: int = 0             # OPT word_embed_proj_dim (0 = dim)
    pre_norm: bool = True          # OPT do_layer_norm_before
    eos_ids: tuple = ()

    def __post_init__(self):  # every field checked against its type: config.json is user input
        num = lambda v: type(v) in (int, float) and 0 < v < math.inf                    # noqa: E731
        for f in fields(self):
            v, name, least = getattr(self, f.name), HF_KEYS.get(f.name, f.name), int(f.default != 0)
            top = 12 if f.name == "n_layers" else 31        # 4096 layers: past any model, and quick to build
            if f.type is int and (type(v) is not int or not least <= v < 2**top):
                raise ModelError(f"config: {name} must be a positive integer below 2**{top}, got {v!r}")
            if (f.type is float and not num(v)) or (f.type is bool and type(v) is not bool):
                want = "a positive number" if f.type is float else "true or false"
                raise ModelError(f"config: {name} must be {want}, got {v!r}")
        if not all(type(e) is int and 0 <= e < self.vocab_size for e in self.eos_ids):
            raise ModelError(f"config: eos_token_id must be token ids below vocab_size, got {self.eos_ids!r}")
        if self.dim % self.n_heads and not self.head_dim:                    # (an explicit head_dim may)
            raise ModelError(f"num_attention_heads={self.n_heads} does not divide hidden_size={self.dim}")
        if (s := self.rope_scaling) and (not all(num(s.get(k)) for k in LLAMA3)
                                         or s["high_freq_factor"] <= s["low_freq_factor"]):
            raise ModelError(f"rope_scaling llama3 needs positive numbers {', '.join(LLAMA3)} "
                             f"(high_freq_factor > low_freq_factor), got {s}")
        self.head_dim, self.embed_dim = self.head_dim or self.dim // self.n_heads, self.embed_dim or self.dim
        if self.arch not in ("llama", "opt"):
            raise ModelError(f"unsupported architecture {self.arch!r} (supported: llama, opt)")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"num_key_value_heads={self.n_kv_heads} does not divide "
                             f"num_attention_heads={self.n_heads}")
        if self.arch == "llama" and self.head_dim % 2:
            raise ModelError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def kv_bytes_per_token(self):  # K and V of every layer, at 2 bytes (fp16) per number
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 2

    @classmethod
    def from_hf(cls, hf: dict):
        """Build from a Hugging Face config.json dict; refuse what this engine does not implement."""
        hf, mt = Need(hf), hf.get("model_type")
        if mt not in ("llama", "opt"):
            raise ModelError(f"unsupported model_type {mt!r} (supported: llama, opt)")
        if bad := next((k for k, want in VARIANT[mt].items() if hf.get(k, want) != want), None):
            raise ModelError(f"unsupported {mt} variant: {bad} {hf[bad]!r} (only {VARIANT[mt][bad]!r})")
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        common = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                      n_heads=hf["num_attention_heads"], max_seq_len=hf.get("max_position_embeddings", 2048),
                      tie_embeddings=hf.get("tie_word_embeddings", mt == "opt"), eos_ids=eos)
        if mt == "llama":
            rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
            if not isinstance(rope, dict):
                raise ModelError(f"config: rope_scaling must be an object, got {rope!r}")
            theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise ModelError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
            return cls(arch="llama", n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       ffn_dim=hf["intermediate_size"], head_dim=hf.get("head_dim") or 0,
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
                       rope_scaling={**LLAMA3, **rope} if kind == "llama3" else {},
                       attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                       **common)
        return cls(arch="opt", n_kv_heads=hf["num_attention_heads"], ffn_dim=hf["ffn_dim"], norm_eps=1e-5,
                   attn_bias=True, mlp_bias=True, embed_dim=hf.get("word_embed_proj_dim") or 0,
                   pre_norm=hf.get("do_layer_norm_before", True), **common)


# --- RoPE
def rope_inv_freq(cfg: Config, device="cpu"):  # (d/2,) float32 on device, computed on the CPU (meta: on meta)
    d, home = cfg.head_dim, "meta" if torch.device(device).type == "meta" else "cpu"
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=home) / d)
    if s := cfg.rope_scaling:  # llama3: stretch low frequencies by `factor`, keep high ones, blend in between
        factor, lo, hi, old = (s[k] for k in LLAMA3)     # factor, low/high_freq_factor, original context
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, blended, scaled)
    return inv.float().to(device)


def rope_tables(inv_freq, pos, dtype=torch.float32):
    """cos, sin for positions pos (B, T), stacked (2, B, 1, T, d); dims j and j + d/2 form a plane."""
    ang = pos[:, None, :, None].float() * inv_freq                   # (B, 1, T, d/2)
    ang = torch.cat([ang, ang], dim=-1)                              # (B, 1, T, d)
    (cs := torch.stack([ang.cos(), ang.sin()]))[1, ..., :ang.shape[-1] // 2].neg_()   # -sin on each
    return cs.to(dtype)        # plane's first dim (the turn's sign); in the model's dtype, as transformers


def apply_rope(x, cos, sin):  # x (B, h, T, d): rotate each plane (x_j, x_{j+d/2}) by its angle
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)   # roll: each plane's two dims swapped


# --- Attention math
def attention(q, k, v, mask):
    """q (B, H, Tq, d), k/v (B, Hkv, Tk, d), mask (B, 1|Hkv|H, Tq, Tk) bool -> (B, H, Tq, d).
    At decode (Tq = 1) the G = H / Hkv query heads of a KV head are folded into the query axis, so the
    kernel sees plain attention (B, Hkv, G, d) and can pick a fused backend (GQA with a mask cannot)."""
    B, H, Tq, d = q.shape
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    if Tq > 1 or G == 1:
        if mask.shape[1] not in (1, H):                                  # a mask per KV head: per query head
            mask = mask.repeat_interleave(G, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)
    mask = mask.view(B, Hkv, G, -1) if mask.shape[1] == H else mask.expand(B, Hkv, G, mask.shape[-1])
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, G, d), k, v, attn_mask=mask)   # (B, Hkv, G, d)
    return out.reshape(B, H, 1, d)                     # (CUDA's kernels may return it in another layout)


def attention_probs(q, k, mask):
    """Softmax weights (for H2O, recall, layer budgets) (B, H, Tq, Tk) float32; mask (B, 1|Hkv|H, Tq, Tk)."""
    B, H, Tq, d = q.shape
    Hkv, Tk, G = k.shape[1], k.shape[2], H // k.shape[1]
    s = (q.float().reshape(B, Hkv, G * Tq, d) @ k.float().mT / math.sqrt(d)).view(B, Hkv, G, Tq, Tk)
    m = mask.view(B, Hkv, G, Tq, Tk) if mask.shape[1] == H else mask[:, :, None]
    return s.masked_fill(~m, float("-inf")).softmax(-1).nan_to_num(0.0).view(B, H, Tq, Tk)


# --- Cache interface
class Cache:
    """The step bookkeeping every policy shares; subclasses implement `attend`.

    Slots are shared by the batch: slot t holds every sequence's t-th token (left-padded prompts start
    with pad slots, which `valid` masks out). Per step a subclass gets `t0` (the first new slot, on the
    host), `at` (T,) the new slots on the device, `pos` (B, T) positions and `mask` (B, 1, T, span), which
    keys each query sees. A prefill chunk reads span = t0 + T slots; a decode step reads all S (those not
    yet written are masked) and writes through `at`, so its shapes and addresses never change and a CUDA
    graph can replay it (infinigen.Graphed), with the host's part of a step, `enter` and `leave`, around
    it. The host counts real tokens itself (`lengths`): a policy sizes things without reading the device.
    """
    def __init__(self, batch, slots, device):
        self.B, self.S, self.t0 = batch, slots, 0
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)   # (B, S)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)          # (B,) real tokens so far
        self.lengths = np.zeros(batch, dtype=np.int64)                          # (B,) the same, on the host
        self.slot = torch.arange(slots, device=device)                          # (S,) slot numbers
        self.next = torch.zeros(1, dtype=torch.long, device=device)             # (1,) t0 on the device

    def enter(self, T, valid_new=None):  # the host's part of begin
        if self.t0 + T > self.S:
            raise ModelError(f"sequence of {self.t0 + T} tokens exceeds the cache's {self.S} slots")
        self.T, self.span = T, self.S if T == 1 else self.t0 + T
        self.new = T if valid_new is None else valid_new.sum(1).cpu().numpy()   # (B,) real new tokens

    def leave(self):  # the host's part of end
        self.lengths = self.lengths + self.new
        self.t0 += self.T

    def begin(self, T, valid_new=None):
        """T new tokens per sequence; valid_new (B, T) bool on the host, False for left padding
        (None: all real, as in a decode step)."""
        self.enter(T, valid_new)
        self.at = self.next + self.slot[:T]                                     # (T,) the new slots
        key, query = self.slot[:self.span], self.at[:, None]
        if valid_new is None:
            self.valid.index_fill_(1, self.at, True)
            self.pos = self.length[:, None] + self.slot[:T]                    # (B, T)
        else:
            valid_new = valid_new.to(self.valid.device, non_blocking=True)
            self.valid.index_copy_(1, self.at, valid_new)
            self.pos = (self.length[:, None] + valid_new.long().cumsum(1) - 1).clamp(min=0)      # (B, T)
        self.mask = (key <= query)[None, None] & self.valid[:, None, None, :self.span]   # (B, 1, T, span)
        if valid_new is not None:                                                   # pads see themselves
            self.mask |= ~valid_new[:, None, :, None] & (key == query)
        return self.pos

    def end(self):
        self.length += self.valid.index_select(1, self.at).sum(1)
        self.next += self.T
        self.leave()

    def attend(self, layer, q, k, v, x, rope):
        raise NotImplementedError


class DenseCache(Cache):
    """The `full` policy: every layer's K and V stay on the device, allocated once."""
    def __init__(self, cfg: Config, batch, slots, device, dtype):
        super().__init__(batch, slots, device)
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)   # (L, B, Hkv, S, d)
        self.k, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in "kv")

    def attend(self, layer, q, k, v, x, rope):
        self.k[layer].index_copy_(2, self.at, k), self.v[layer].index_copy_(2, self.at, v)
        return attention(q, self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span], self.mask)


# --- Modules
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x / rms(x), in float32 at least, rounded to x's dtype, times the weight
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)   # (one fused kernel on CUDA)


def make_norm(cfg):
    return RMSNorm(cfg.dim, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, H, Hkv, d = cfg, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * d, bias=cfg.attn_bias)
        self.wk, self.wv = (nn.Linear(cfg.dim, Hkv * d, bias=cfg.attn_bias) for _ in "kv")
        self.wo = nn.Linear(H * d, cfg.dim, bias=cfg.attn_bias)

    def heads(self, y, h):  # (B, T, h*d) -> (B, h, T, d)
        return y.view(y.shape[0], y.shape[1], h, self.cfg.head_dim).transpose(1, 2)

    def query(self, x, rope):  # the query of this layer for input x (B, T, C): (B, H, T, d), RoPE applied
        q = self.heads(self.wq(x), self.cfg.n_heads)
        return q if rope is None else apply_rope(q, *rope)

    def forward(self, x, layer, cache: Cache, rope):
        H, Hkv = self.cfg.n_heads, self.cfg.n_kv_heads
        q, k, v = self.heads(self.wq(x), H), self.heads(self.wk(x), Hkv), self.heads(self.wv(x), Hkv)
        if rope is not None:                                 # q and k rotated in one go: (B, H + Hkv, T, d)
            q, k = apply_rope(torch.cat([q, k], 1), *rope).split([H, Hkv], 1)
        o = cache.attend(layer, q, k, v, x, rope)                          # (B, H, T, d)
        return self.wo(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.llama = cfg.arch == "llama"
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias) if self.llama else None   # SwiGLU
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x) if self.llama else F.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.pre = cfg.pre_norm
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, layer, cache, rope):  # x (B, T, C)
        if self.pre:
            x = x + self.attn(self.attn_norm(x), layer, cache, rope)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, layer, cache, rope))   # OPT-350m: post-norm
        return self.mlp_norm(x + self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        if cfg.arch == "opt":
            self.pos_embed = nn.Embedding(cfg.max_seq_len + 2, cfg.dim)   # OPT's positions start at 2
            if cfg.embed_dim != cfg.dim:
                self.proj_in = nn.Linear(cfg.embed_dim, cfg.dim, bias=False)
                self.proj_out = nn.Linear(cfg.dim, cfg.embed_dim, bias=False)
        else:
            self.inv_freq = rope_inv_freq(cfg, torch.get_default_device())  # not a buffer: see _apply
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.pre_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)

    def _apply(self, fn, recurse=True):  # .to, .half, to_empty: RoPE's frequencies are made anew in float32
        super()._apply(fn, recurse)            # (a buffer's dtype would follow the weights' and round them)
        if self.cfg.arch == "llama":
            self.inv_freq = rope_inv_freq(self.cfg, self.embed.weight.device)
        return self

    def forward(self, tokens, cache: Cache | None = None, valid=None, last=False):
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) of the last position only (last=True).
        Without a cache: a fresh dense one (uncached forward)."""
        if cache is None:
            p = next(self.parameters())
            cache = DenseCache(self.cfg, tokens.shape[0], tokens.shape[1], p.device, p.dtype)
        pos = cache.begin(tokens.shape[1], valid)                         # (B, T)
        x = self.embed(tokens)                                            # (B, T, C)
        if self.cfg.arch == "opt":
            x = (self.proj_in(x) if hasattr(self, "proj_in") else x) + self.pos_embed(pos + 2)
        rope = rope_tables(self.inv_freq, pos, x.dtype) if self.cfg.arch == "llama" else None
        for i, block in enumerate(self.layers):
            x = block(x, i, cache, rope)
        x = self.norm(x[:, -1:] if last else x)
        x = self.proj_out(x) if hasattr(self, "proj_out") else x
        cache.end()
        return self.lm_head(x)


# --- Tokenizer and chat format
class Tok:
    """tokenizer.json through `tokenizers`, plus the chat format a folder's chat.json names."""
    def __init__(self, folder):
        from tokenizers import Tokenizer
        path, chat = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "chat.json")
        if not os.path.isfile(path):
            raise ModelError(f"no tokenizer.json in {folder}")
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:                                # `tokenizers` raises a bare Exception
            raise ModelError(f"{path} is not a tokenizer: {e}") from None
        self.chat = read_json(chat) if os.path.exists(chat) else None
        c = self.chat or {}                                     # the one format we write: ChatML
        stop, system, fmt = c.get("stop", []), c.get("system") or "", c.get("format", "chatml")
        if fmt != "chatml" or not isinstance(stop, list) or {type(s) for s in [*stop, system]} - {str}:
            raise ModelError(f'{chat}: "format" must be "chatml", "stop" a list of strings, "system" text')
        self.stop_ids = [self.tok.token_to_id(s) for s in stop if self.tok.token_to_id(s) is not None]

    def encode(self, text, chat=True):
        if chat and self.chat:  # ChatML
            sys_msg = self.chat.get("system") and f"<|im_start|>system\n{self.chat['system']}<|im_end|>\n"
            text = f"{sys_msg or ''}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        try:
            return self.tok.encode(text).ids
        except Exception as e:                          # a bare Exception (WordLevel without unk ...)
            raise ModelError(f"tokenizer.json cannot encode the text: {e}") from None

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


# --- Loading
HF_NAMES = [  # (Hugging Face name, ours); {i} is the layer index
    ("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight")] + [(f"model.decoder.{a}", b) for a, b in [
    ("embed_tokens.weight", "embed.weight"), ("embed_positions.weight", "pos_embed.weight"),
    ("project_in.weight", "proj_in.weight"), ("project_out.weight", "proj_out.weight"),
    ("final_layer_norm.weight", "norm.weight"), ("final_layer_norm.bias", "norm.bias")]
] + [(f"{pre}.layers.{{i}}.{a}.{w}", f"layers.{{i}}.{b}.{w}") for w in ("weight", "bias") for pre, a, b in [
    ("model", "input_layernorm", "attn_norm"), ("model", "post_attention_layernorm", "mlp_norm"),
    ("model", "self_attn.q_proj", "attn.wq"), ("model", "self_attn.k_proj", "attn.wk"),
    ("model", "self_attn.v_proj", "attn.wv"), ("model", "self_attn.o_proj", "attn.wo"),
    ("model", "mlp.gate_proj", "mlp.gate"), ("model", "mlp.up_proj", "mlp.up"),
    ("model", "mlp.down_proj", "mlp.down"),
    ("model.decoder", "self_attn_layer_norm", "attn_norm"), ("model.decoder", "final_layer_norm", "mlp_norm"),
    ("model.decoder", "self_attn.q_proj", "attn.wq"), ("model.decoder", "self_attn.k_proj", "attn.wk"),
    ("model.decoder", "self_attn.v_proj", "attn.wv"), ("model.decoder", "self_attn.out_proj", "attn.wo"),
    ("model.decoder", "fc1", "mlp.up"), ("model.decoder", "fc2", "mlp.down")]]


def map_name(name):  # a Hugging Face tensor name -> ours, or None when we do not use it
    i = next((p for p in name.split(".") if p.isdigit()), None)
    for hf, ours in HF_NAMES:
        if i is not None and hf.format(i=i) == name:
            return ours.format(i=i)
        if "{i}" not in hf and hf == name:
            return ours
    return None


def resolve(path_or_id):
    """A local folder, or a hub id fetched with huggingface_hub (only the files we read)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise ModelError(f"{path_or_id} is a file, not a model folder")
    if path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
        raise ModelError(f"model folder not found: {path_or_id}")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, allow_patterns=[
            "config.json", "*.safetensors", "*.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "chat.json"])
    except Exception as e:  # offline, unknown repo, gated ...
        raise ModelError(f"no folder {path_or_id} here, and cannot fetch it from the hub: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def load(path_or_id, device="cpu", dtype=torch.float32):
    """Read config.json and safetensors weights (single or sharded) into a Transformer."""
    from safetensors import SafetensorError, safe_open
    folder = resolve(path_or_id)
    cfg = Config.from_hf(read_json(os.path.join(folder, "config.json")))
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        if not isinstance(files := read_json(index).get("weight_map"), dict):
            raise ModelError(f"{index} lacks a \"weight_map\" object (tensor name -> file)")
        files = sorted({str(f) for f in files.values()})
    else:
        files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise ModelError(f"no .safetensors weights in {folder}")
    if absent := [f for f in files if not os.path.isfile(os.path.join(folder, f))]:   # a FIFO would hang
        raise ModelError(f"weights file {absent[0]!r} is not in {folder} (or not a regular file)")
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
    except RuntimeError as e:                              # sizes whose product overflows a tensor
        raise ModelError(f"config.json describes tensors too large to build: {e}") from None
    params, loaded, extra = dict(model.named_parameters()), {}, []
    for fname in files:
        try:
            with safe_open(os.path.join(folder, fname), framework="pt") as f:
                for name in f.keys():
                    if (ours := map_name(name)) is None or ours not in params:   # not a weight we use,
                        extra += [name] * (ours not in (None, "lm_head.weight"))   # or no place for it
                        continue                                # (a layer past n_layers, a bias): extra
                    if (t := f.get_tensor(name)).shape != (want := params[ours].shape):
                        raise ModelError(f"{name}: shape {tuple(t.shape)} in the file, {tuple(want)} "
                                         "expected (does config.json match them?)")
                    loaded[ours] = t.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:   # header not JSON, data shorter than the header says ...
            raise ModelError(f"{os.path.join(folder, fname)} is not a valid safetensors file: {e}") from None
    if extra:
        raise ModelError(f"{len(extra)} weights have no place in {folder}'s config.json, e.g. {extra[0]}")
    if cfg.tie_embeddings:                                  # (untied and absent: missing, below)
        loaded["lm_head.weight"] = loaded.get("embed.weight")
    if missing := [n for n in params if loaded.get(n) is None]:
        raise ModelError(f"{len(missing)} weights missing from {folder}, e.g. {missing[0]} "
                         f"(do its tensor names and sizes match a {cfg.arch} checkpoint?)")
    model.load_state_dict(loaded, assign=True)
    return model.to(device).eval(), folder                 # RoPE's frequencies (float32) onto the device too


def load_with_tokenizer(name, device="cpu", dtype=torch.float32):
    """load() plus the folder's tokenizer; name None = the built-in default model (prepared once)."""
    if name is None:
        import prepare
        name = prepare.prepare()
    model, folder = load(name, device, dtype)
    tok = Tok(folder)
    if (n := max(tok.tok.get_vocab().values(), default=-1) + 1) > model.cfg.vocab_size:
        raise ModelError(f"tokenizer.json has token ids up to {n - 1}, past the model's vocab_size "
                         f"{model.cfg.vocab_size}")
    return model, tok
