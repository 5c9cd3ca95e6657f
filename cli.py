"""The command line of the engine: `python infinigen.py` (generation), and what every script shares:
a parser whose errors are one line, the checks of numbers and files a user gives, results written whole."""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading

import torch

import model as M
import skew as SK
from infinigen import GATHERS, PAPER, POLICIES, Policy, calibrate, generate
from offload import GraphError, OffloadError

KNOWN = (M.ModelError, OffloadError, ValueError, OSError, ImportError,   # what a user's input can cause
         RecursionError)                                                   # JSON nested past Python's limit
MAX_TEXT = 256 * 2**20                                                  # bytes of one text file


# --- Command line
def fail(message):
    """Exit with one line on stderr (a message that holds newlines is joined) and status 1."""
    sys.exit("error: " + " ".join(str(message).splitlines()))


def interrupted(what=""):
    """Ctrl-C: one line on stderr, status 130 (the shell's code for SIGINT)."""
    print(f"interrupted{what}", file=sys.stderr)
    sys.exit(130)


def run_script(main):
    """A script's main under Python's Ctrl-C (the quiet exit while torch imports ends here); a Ctrl-C
    that escapes main (while its flags are read, before main has its own) is the same one line, 130."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        main()
    except KeyboardInterrupt:
        interrupted()


class Once(argparse._StoreAction):
    """A flag of one value given twice with two values is refused: the last would silently win."""
    def __call__(self, parser, ns, value, option_string=None):
        first = parser.given.setdefault(self.dest, value)
        if first != value and not (first != first and value != value):    # nan != nan, even given once
            parser.error(f"argument {option_string}: given twice ({first!r}, then {value!r})")
        super().__call__(parser, ns, value, option_string)


class Parser(argparse.ArgumentParser):
    def __init__(self, *a, prints=False, **kw):  # prints: what it is run for ends on stdout, none: refused
        super().__init__(*a, **kw)
        self.register("action", None, Once)                 # every plain flag of every script
        self.given, self.prints = {}, prints

    def error(self, message):  # one line, no usage dump
        fail(message)

    def parse_args(self, args=None, namespace=None):
        self.given = {}
        ns = super().parse_args(args, namespace)
        for act in self._actions:      # before Python 3.13 argparse turns --flag=-- into []: refuse that
            v = getattr(ns, act.dest, None)
            if isinstance(v, list) and (v == [] or [] in v):
                self.error(f"argument {'/'.join(act.option_strings)}: expected one argument")
        if self.prints and sys.stdout is None:                 # `>&-`: the run's answer would go nowhere
            self.error("standard output is closed, so the results would be lost: redirect it (> FILE)")
        return ns


def out_of_memory(e):
    """Whether e says memory ran out: torch's OutOfMemoryError, Python's MemoryError, or the RuntimeError
    of torch's CPU allocator or of a failed mmap (matched by message: any other RuntimeError is a bug)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("DefaultCPUAllocator: can't allocate memory", "Cannot allocate memory"))


def positive_int(s):
    if not s.isdecimal() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s[:40]!r}")
    return int(s)


PAPER_FLAGS = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in dict(policy="infinigen", **PAPER).items())


def add_paper(p, calibrated_on="the prompt unless --calib"):
    p.add_argument("--paper", action="store_true",
                   help=f"the authors' settings: {PAPER_FLAGS} (the skew calibrated on {calibrated_on}); a "
                        "flag given next to --paper wins")


def parse_args(p, argv=None):
    """Parse; with --paper the preset becomes the defaults, so flags given explicitly still win."""
    args = p.parse_args(argv)
    if args.paper:
        p.set_defaults(policy="infinigen", **PAPER)
        args = p.parse_args(argv)
    return args


# --- Files
def read_text(path, what="file"):
    """A UTF-8 text file, whole: a ValueError naming `path` for what is not one (missing, a folder, a
    device such as /dev/zero, unreadable, binary, larger than MAX_TEXT). Never blocks on a pipe."""
    if not os.path.exists(path):
        raise ValueError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{what} is not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT + 1)
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_TEXT:
        raise ValueError(f"{what} {path} is larger than {MAX_TEXT // 2**20} MiB")
    try:
        text = data.decode("utf-8-sig")                      # a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start}: 0x{data[e.start]:02x})") from None
    if "\x00" in text:
        raise ValueError(f"{what} {path} is binary, not text (it holds NUL bytes)")
    return text


@contextlib.contextmanager
def whole(path):
    """Write `path` whole or not at all: yields a temporary name next to it (same extension, for
    matplotlib), renamed over `path` when the block ends, removed when it fails or is interrupted.
    A link is followed; a path that is not a regular file (a folder, /dev/null, a FIFO) is not replaced."""
    path = regular(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def temp_name(path):  # the name a file is written under before it replaces `path` (same extension)
    return f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"


def regular(path, what="results file"):
    """The real path (a link followed) of a file about to be replaced: refused where it is not a file."""
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isfile(real):
        raise ValueError(f"{what} {path} is not a regular file (a folder, device or FIFO is not replaced)")
    return real


def writable(path, what="results file"):
    """regular(path), also refused now (before the work whose results it would hold) when its folder
    cannot be made or written: a probe file."""
    real = regular(path, what)
    probe = temp_name(real)
    try:
        os.makedirs(os.path.dirname(real), exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write {what} {path}: {e.strerror or e}") from None
    return real


def json_number(v):  # a number of a results file that a report can format: not true, nor 10**400
    return type(v) is float or type(v) is int and abs(v) < 2**63


def write_json(path, data):
    with whole(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)


# --- Streaming text
class Stream:
    """Text of tokens as they come, whole characters only. Each token decodes only a window (the tokens
    of the last piece printed, for context, and those since), so the cost per token stays constant: the
    text printed equals the decoded whole. Stop tokens are skipped (generate drops them from its output)."""
    def __init__(self, tok, skip=()):
        self.tok, self.skip, self.ids, self.read = tok, set(skip), [], 0

    def push(self, t):
        """The text that token t completes ('' while a character is still incomplete)."""
        if t in self.skip:
            return ""
        self.ids.append(t)
        return self.flush(final=False)

    def flush(self, final=True):
        head, text = self.tok.decode(self.ids[:self.read]), self.tok.decode(self.ids)
        cut = len(self.ids)
        if not final and text.endswith("\ufffd"):          # a split character, or bytes that never decode
            if cut - self.read < 8:
                return ""
            # 8 tokens on: print up to the last token whose text is settled (the last character may end)
            cut = next((k for k in range(cut - 1, self.read, -1)
                        if text[:-1].startswith(self.tok.decode(self.ids[:k]))), cut)
            text = self.tok.decode(self.ids[:cut])
        self.ids, self.read = self.ids[self.read:], cut - self.read
        return text[len(head):]


def build_parser():
    p = Parser(description="InfiniGen reference engine: generate with a KV-cache policy.", prints=True)
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
    a("--head-count", choices=["own", "mean"], default=d.head_count,
      help="infinigen: own, each KV head its count within alpha; mean, every head the heads' mean count "
           "(the authors' rule)")
    a("--partial-ratio", type=float, default=d.partial_ratio,
      help="infinigen: share of head dims in partial keys")
    a("--skew", choices=SK.MODES, default=d.skew)
    a("--dense-layers", type=int, default=d.dense_layers)
    a("--recent", type=float, default=d.recent, help="h2o/streaming: share of the budget for recent tokens")
    a("--cpu-kv-capacity", type=float, default=0,
      help="CPU pool: tokens per sequence (a whole number > 1) or fraction (<= 1) of prompt + new tokens; "
           "one that holds them all makes no pool (nothing to evict; no pool_misses in --json)")
    a("--eviction", choices=["fifo", "lru", "counter"], default=None, help=f"default: {d.eviction}")
    a("--layer-budget", choices=["uniform", "prompt"], default=d.layer_budget,
      help="prompt: share the budget among sparse layers by the need measured at prefill")
    a("--measure-recall", action="store_true", help="also compute full attention to report captured mass")
    a("--calib", help="infinigen: calibrate the skew offline on this text file (default: on the prompt)")
    a("--gather", choices=GATHERS, default=d.gather,
      help="how selected rows reach the device: host (CPU gather + one copy) or device (a kernel reads "
           "pinned memory); auto: device on CUDA")
    a("--no-graphs", dest="graphs", action="store_false",
      help="CUDA: run every decode step op by op (default: replay it as a CUDA graph where it can be)")
    add_paper(p)
    a("--time-copies", action="store_true",
      help="CUDA: time the waits for copies (copy_wait_s) with events, a sync per step; the decode steps "
           "then run op by op (--no-graphs: a graph's waits cannot be timed)")
    return p


def check(args, pol, dev=None):
    """The numbers and combinations Policy does not check itself: a flag is never silently ignored."""
    if args.prompt_file is not None and args.prompt:
        raise ValueError("--prompt and --prompt-file both given: choose one")
    if args.time_copies and pol.name == "full":
        raise ValueError("--time-copies times the waits for copies from the CPU store: full has none")
    if args.time_copies and dev is not None and dev.type != "cuda":
        raise ValueError("--time-copies times CUDA copies with events: on a CPU every copy's wait is timed "
                         "anyway (copy_wait_s)")
    if args.calib is not None and pol.name != "infinigen":
        raise ValueError(f"--calib calibrates InfiniGen's skew: it needs --policy infinigen, not {pol.name}")
    if not (args.temperature == 0 or 1e-4 <= args.temperature < math.inf):
        raise ValueError(f"--temperature must be 0 (greedy) or finite and >= 1e-4, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not -2**63 <= args.seed < 2**64:
        raise ValueError(f"--seed must fit in 64 bits, got {args.seed}")


def check_dense(pol, cfg):
    """--dense-layers past the model's layers would leave nothing sparse: a slip, not a wish (equal to
    them is full attention kept whole on the device, an end of a sweep)."""
    if pol.name not in ("full", "offload") and pol.dense_layers > cfg.n_layers:
        raise ValueError(f"--dense-layers {pol.dense_layers} is more than the model's {cfg.n_layers} layers")


def eviction_of(args):
    """--eviction (None: Policy's default), refused without a bounded pool to evict from."""
    if args.eviction and not args.cpu_kv_capacity:
        raise ValueError("--eviction chooses what a bounded CPU pool evicts: it needs --cpu-kv-capacity")
    return args.eviction or Policy().eviction


def policy_of(args):  # --time-copies: the steps op by op (a graph's waits cannot be timed)
    return Policy(args.policy, budget_of(args.budget), args.alpha, args.partial_ratio, args.skew,
                  args.dense_layers, args.recent, capacity=args.cpu_kv_capacity, eviction=eviction_of(args),
                  measure_recall=args.measure_recall, layer_budget=args.layer_budget, gather=args.gather,
                  graphs=args.graphs and not args.time_copies, head_count=args.head_count)


def budget_of(b):  # a token count past any context means all of it (and stays a 64-bit integer)
    return min(b, 2**31) if math.isfinite(b) else b


def tokens(tok, text, context, chat=True, head=16):
    """The prompt's token ids. A text far past the context (a book) is refused from its beginning, not
    after tokenizing it all: when its first `head` characters per token of context already need more tokens
    than the context holds (16 of slack for a word cut in two), the whole needs more too."""
    if len(text) > head * context and len(tok.encode(text[:head * context], chat=False)) > context + 16:
        raise ValueError(f"the prompt's first {head * context} characters alone exceed the model's context "
                         f"of {context} tokens ({len(text)} characters in all)")
    return tok.encode(text, chat=chat)


def device_of(name):
    """auto | cpu | cuda -> a torch device; cuda where there is none is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def main(argv=None, script=False):
    """The command line; `script`: this process ends with it (python infinigen.py), so after a Ctrl-C
    further ones stay ignored through the exit instead of breaking into the interpreter's shutdown."""
    args = parse_args(build_parser(), argv)
    if script:                  # a terminal that cannot show a character gets its escape, not an error
        sys.stdout.reconfigure(errors="backslashreplace")     # (a closed stdout: refused by parse_args)
    run = Run(args)             # Ctrl-C as Python's default has it (not ignored, main thread): ours
    ours = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    before, stop = signal.signal(signal.SIGINT, run.sigint) if ours else None, False
    try:
        run.go()
    except BrokenPipeError:                          # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (*KNOWN, torch.OutOfMemoryError, GraphError) as e:    # GraphError: a bug; --no-graphs avoids it
        fail(e)
    except (RuntimeError, MemoryError) as e:         # host memory ran out; else a bug
        if not out_of_memory(e):
            raise
        fail(f"out of host memory: {e or 'MemoryError'} (fewer prompts or tokens, or a smaller model)")
    except KeyboardInterrupt:
        if ours:
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C does not cut the last words
            stop = script
        run.interrupted()
    finally:
        if ours and not stop:
            signal.signal(signal.SIGINT, before)


class Run:
    """One generation of the command line; what it generated so far survives a Ctrl-C."""
    def __init__(self, args):
        self.args, self.got, self.stream = args, [], None    # got: per step, the token of each sequence
        self.n = 1 if args.prompt_file is not None else len(args.prompt or [None])     # sequences
        self.busy = self.pending = False

    def go(self):
        args = self.args
        dev = device_of(args.device)
        dtype = getattr(torch, args.dtype or ("float16" if dev.type == "cuda" else "float32"))
        pol = policy_of(args)
        check(args, pol, dev)
        prompts = [read_text(args.prompt_file, "prompt file")] if args.prompt_file is not None else [
            p.encode("utf-8", "surrogateescape").decode("utf-8", "replace")          # bytes argv held
            for p in args.prompt or ["Explain in two sentences why the sky is blue."]]
        calib = read_text(args.calib, "calibration file") if args.calib is not None else None
        model, tok = M.load_with_tokenizer(args.model, dev, dtype)
        check_dense(pol, model.cfg)
        ids = [tokens(tok, p, model.cfg.max_seq_len, chat=not args.no_chat) for p in prompts]
        partial = None
        if calib is not None:                                       # (check: only with infinigen)
            cal = tok.encode(calib[:2**20], chat=False)[:min(1024, model.cfg.max_seq_len)]   # 1 MiB is plenty
            if not cal:
                raise ValueError(f"calibration file {args.calib} holds no tokens")
            partial = calibrate(model, torch.tensor([cal]), pol)
        self.tok, self.stop = tok, list(model.cfg.eos_ids) + tok.stop_ids
        self.stream = Stream(tok, self.stop) if len(ids) == 1 and not args.json else None
        out, st = generate(model, ids, pol, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                           self.stop, self.on_token, partial, progress=not args.json,
                           time_copies=args.time_copies)
        self.show(out, st)

    def on_token(self, nxt):  # (B,) tokens; with one sequence, print its text as it comes
        self.busy = True                                  # a Ctrl-C now waits for this token to be printed
        self.got.append(nxt.tolist())
        if self.stream:
            print(self.stream.push(self.got[-1][0]), end="", flush=True)
        self.busy = False
        if self.pending:
            raise KeyboardInterrupt

    def sigint(self, *_):  # so that what was printed and what was kept agree
        if not self.busy:
            raise KeyboardInterrupt
        self.pending = True

    def show(self, out, st=None):
        args, texts = self.args, [self.tok.decode(o) if o else "" for o in out]
        if args.json:
            one = len(texts) == 1
            res = {"text": texts[0] if one else texts, "tokens": out[0] if one else out}
            print(json.dumps(res | {"stats": st or None} | ({} if st else {"interrupted": True})))
            return
        print(self.stream.flush() if self.stream else "\n---\n".join(texts))
        if not st:
            return
        n = st["decode_steps"]
        print(f"[{args.policy}] prefill {st['prefill_s']:.2f}s, decode {n} step{'s' * (n != 1)} in "
              f"{st['decode_s']:.2f}s ({st['tokens_per_s'] or '-'} tok/s), "
              f"KV {st['kv_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
        if "fetched_fraction_per_layer" in st:
            f = st["fetched_fraction_per_layer"]
            print(f"  fetched {sum(f) / len(f):.3f} of the KV per layer on average, "
                  f"{st['h2d_bytes_per_step'] / 2**20:.2f} MiB host->device per step", file=sys.stderr)
        say = lambda line: print("  " + line, file=sys.stderr)      # recall, pool, timing: when measured
        if "recall_per_layer" in st:
            r = st["recall_per_layer"]
            say(f"recall {sum(r) / len(r):.3f} of the attention mass per layer on average")
        if "pool_misses" in st:
            say(f"pool: {st['pool_misses']} misses in {st['pool_requests']} requests")
        if st.get("copy_wait_s") is not None:
            say(f"waited {st['copy_wait_s']:.3f}s for copies, "
                f"{st['copy_wait_per_step_s'] * 1e3:.2f} ms per decode step")

    def interrupted(self):
        """Ctrl-C: print what was generated (the rest of the streamed text, or each sequence; --json: one
        object, also before any token), exit 130."""
        if self.got or self.args.json:
            rows = [list(r) for r in zip(*self.got)] or [[] for _ in range(self.n)]     # per sequence
            self.show([r[:next((j for j, x in enumerate(r) if x in self.stop), len(r))] for r in rows])
        interrupted(f" after {len(self.got)} new token{'s' * (len(self.got) != 1)}" if self.got else "")
