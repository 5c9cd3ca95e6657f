"""The command line of the engine: `python infinigen.py` (generation), and what every script shares:
a parser whose errors are one line, and the checks of numbers and files a user gives."""
import argparse
import json
import os
import sys

import torch

import model as M
import skew as SK
from infinigen import GATHERS, PAPER, POLICIES, Policy, calibrate, generate
from offload import OffloadError


# --- Command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.exit(f"error: {message}")


def positive_int(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


PAPER_FLAGS = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in dict(policy="infinigen", **PAPER).items())


def add_paper(p):
    p.add_argument("--paper", action="store_true",
                   help=f"the authors' settings: {PAPER_FLAGS} (the skew calibrated on the prompt unless "
                        "--calib); a flag given next to --paper wins")


def parse_args(p, argv=None):
    """Parse; with --paper the preset becomes the defaults, so flags given explicitly still win."""
    args = p.parse_args(argv)
    if args.paper:
        p.set_defaults(policy="infinigen", **PAPER)
        args = p.parse_args(argv)
    return args


def build_parser():
    p = Parser(description="InfiniGen reference engine: generate with a KV-cache policy.")
    a = p.add_argument
    a("--model", default=None, help="model folder or hub id (default: the built-in SmolLM2-135M-Instruct)")
    a("--prompt", action="append", help="prompt text (repeat for a batch)")
    a("--prompt-file", help="read the prompt from a file")
    a("--max-new-tokens", type=positive_int, default=128)
    a("--temperature", type=float, default=0.0, help="0 = greedy")
    a("--top-p", type=float, default=1.0)
    a("--seed", type=int, default=0)
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
      help="default: float32 on CPU, float16 on CUDA")
    a("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat format")
    a("--json", action="store_true", help="print one JSON object: text, tokens, stats")
    a("--policy", choices=POLICIES, default="full")
    d = Policy()
    a("--budget", type=float, default=d.budget, help="past tokens per sparse layer: fraction (<=1) or count")
    a("--alpha", type=float, default=d.alpha, help="infinigen: keep speculated scores above max - alpha")
    a("--partial-ratio", type=float, default=d.partial_ratio,
      help="infinigen: share of head dims in partial keys")
    a("--skew", choices=SK.MODES, default=d.skew)
    a("--dense-layers", type=int, default=d.dense_layers)
    a("--recent", type=float, default=d.recent, help="h2o/streaming: share of the budget for recent tokens")
    a("--cpu-kv-capacity", type=float, default=0,
      help="CPU pool: tokens per sequence (>1) or fraction of context")
    a("--eviction", choices=["fifo", "lru", "counter"], default=d.eviction)
    a("--layer-budget", choices=["uniform", "prompt"], default=d.layer_budget,
      help="prompt: share the budget among sparse layers by the need measured at prefill")
    a("--measure-recall", action="store_true", help="also compute full attention to report captured mass")
    a("--calib", help="infinigen: calibrate the skew offline on this text file (default: on the prompt)")
    a("--gather", choices=GATHERS, default=d.gather,
      help="how selected rows reach the device: host (CPU gather + one copy) or device (a kernel reads "
           "pinned memory); auto: device on CUDA")
    add_paper(p)
    a("--time-copies", action="store_true", help="CUDA: time the waits for copies (copy_wait_s) with events")
    return p


def main(argv=None):
    args = parse_args(build_parser(), argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
        dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype or ("float16" if dev.type == "cuda" else "float32"))
        pol = Policy(args.policy, args.budget, args.alpha, args.partial_ratio, args.skew, args.dense_layers,
                     args.recent, capacity=args.cpu_kv_capacity, eviction=args.eviction,
                     measure_recall=args.measure_recall, layer_budget=args.layer_budget, gather=args.gather)
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], "
                             f"got {args.temperature}, {args.top_p}")
        if missing := [f for f in (args.prompt_file, args.calib) if f and not os.path.isfile(f)]:
            raise ValueError(f"file not found: {missing[0]}")
        read = lambda f: open(f, encoding="utf-8", errors="replace").read()
        prompts = [read(args.prompt_file)] if args.prompt_file else \
            args.prompt or ["Explain in two sentences why the sky is blue."]
        model, tok = M.load_with_tokenizer(args.model, dev, dtype)
        ids = [tok.encode(p, chat=not args.no_chat) for p in prompts]
        partial = None
        if args.calib and pol.name == "infinigen":
            partial = calibrate(model, torch.tensor([tok.encode(read(args.calib), chat=False)[:1024]]), pol)
        stream, acc = len(ids) == 1 and not args.json, []

        def on_token(nxt):  # print text as it is produced (whole characters only)
            before = tok.decode(acc)
            acc.append(int(nxt[0]))
            if not tok.decode(acc).endswith("\ufffd"):
                print(tok.decode(acc)[len(before.rstrip("\ufffd")):], end="", flush=True)

        stop = list(model.cfg.eos_ids) + tok.stop_ids
        out, st = generate(model, ids, pol, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                           stop, on_token if stream else None, partial, progress=not args.json,
                           time_copies=args.time_copies)
    except (M.ModelError, OffloadError, ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    texts = [tok.decode(o) for o in out]
    if args.json:
        one = len(texts) == 1
        print(json.dumps({"text": texts[0] if one else texts, "tokens": out[0] if one else out, "stats": st}))
        return
    print("" if stream else "\n---\n".join(texts))
    print(f"[{args.policy}] prefill {st['prefill_s']:.2f}s, decode {st['decode_steps']} steps in "
          f"{st['decode_s']:.2f}s ({st['tokens_per_s']} tok/s), KV {st['kv_bytes'] / 2**20:.1f} MiB",
          file=sys.stderr)
    if "fetched_fraction_per_layer" in st:
        f = st["fetched_fraction_per_layer"]
        print(f"  fetched {sum(f) / len(f):.3f} of the KV per layer on average, "
              f"{st['h2d_bytes_per_step'] / 2**20:.2f} MiB host->device per step", file=sys.stderr)
