"""Decode throughput of the engine's policies against Hugging Face transformers.

  python bench.py --suite cpu       the default model, batch 1, a 512-token prompt, 128 new tokens,
                                    float32, on this CPU: full / offload / infinigen vs transformers
                                    `generate`; also the peak resident memory of the demo command.
  python bench.py --suite gpu       rows of model x (batch x context) x policy, float16, with transformers'
                                    DynamicCache on the GPU and offloaded as the outside reference. Each
                                    row goes into results/bench-<gpu>.json as soon as it is measured (rows
                                    of other runs stay), with the PCIe floor of its bytes at the pinned
                                    bandwidth measured in the same run. Flags choose models, shapes and
                                    policies, so the suite can run in short calls; `--device cpu` runs the
                                    same code on a CPU.
  python bench.py --suite timeline  traced decode steps of `offload` and `infinigen`: when each layer
                                    computed and each copy ran, and the copy wait of each step.
  python bench.py --suite gather    the two gathers of KVStore.fetch (host, device kernel) in GB/s of
                                    useful bytes, rows of 128-512 bytes, 5-20% of a layer; and which
                                    attention kernel decode's shapes get.
  python bench.py --suite profile   one decode step per policy (default full, infinigen:0.1) under torch's
                                    profiler: device time per kernel, summed by name, the largest first.
  python bench.py --suite report --results FILE
                                    a gpu suite's results file as a Markdown table (the README's), and
                                    issue 10's targets, each measured, its goal, and met or not.
Prints tables, writes results/. Timings are reported, never asserted.
How decode time is measured: ours from `generate`'s stats (prefill synced and excluded, then the
N-1 decode forwards of N new tokens). Transformers: a LogitsProcessor stamps the time (after a sync
on CUDA) each time it is called, i.e. once after every forward; decode time = last stamp - first
stamp, which spans the same N-1 decode forwards, and prefill time = first stamp - start.
"""
import datetime
import functools
import gc
import importlib.util
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

if __name__ == "__main__":  # a Ctrl-C while torch imports: no traceback, status 130
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
import torch

import cli
import infinigen as I
import model as M
import prepare
import skew as SK
from offload import KVStore, OffloadError, device_kernel, host_tensor, preflight, triton_available

ROOT = os.path.dirname(os.path.abspath(__file__))
LICENSES = "/usr/share/common-licenses"


def say(*a):
    print(*a, file=sys.stderr, flush=True)


# --- Common helpers
def env_info():
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        names = (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        cpu = next(names, "")
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = None
    return {"command": " ".join(["python"] + sys.argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": tf,
            "processor": platform.processor() or platform.machine(),              # '' on Linux: the machine
            "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


write_json = cli.write_json  # whole or not at all: a temporary file, then a rename


def write(path, data):
    data["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(path, data)
    say(f"wrote {path}")


def table(rows, cols):
    """Print rows (dicts) as aligned columns; None shows as '-'."""
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, width)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, width)))


WARM_STEPS = 2   # decode steps a GPU row's step time leaves out: Triton specializes, a CUDA graph records


def steady(stamps, B):
    """The mean decode step from the times after each forward (the first: prefill's), leaving out the first
    WARM_STEPS decode steps where enough steps follow them; and tokens/s at that step."""
    k = WARM_STEPS if len(stamps) > WARM_STEPS + 2 else 0
    if len(stamps) - 1 - k < 1:
        return {}
    step = (stamps[-1] - stamps[k]) / (len(stamps) - 1 - k)
    return {"steady_step_s": round(step, 5), "warm_steps": k, "steady_tokens_per_s": round(B / step, 2)}


def ours(model, prompts, policy, new, **kw):  # our generate, never stopping early (no stop ids)
    pol = policy if isinstance(policy, I.Policy) else I.Policy(policy)
    return I.generate(model, prompts, pol, new, stop_ids=(), **kw)


def hf_cache_name(hf):
    """transformers' name for the cache, as a keyword and an output field: `cache` since it renamed
    `past_key_values` (a FutureWarning in 5.25; the GPU machine's 5.17 knows only the old name)."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def hf_generate(hf, ids, new, cache=None):
    """transformers `generate`, greedy, exactly `new` tokens; timed by logits-processor stamps."""
    from transformers import LogitsProcessor, LogitsProcessorList

    t = []

    class Stamp(LogitsProcessor):  # called once after every forward
        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            t.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0,
                          logits_processor=LogitsProcessorList([Stamp()]), **{hf_cache_name(hf): cache})
    steps, decode_s = len(t) - 1, t[-1] - t[0]
    return out[:, ids.shape[1]:].tolist(), {
        "prefill_s": round(t[0] - t0, 4), "decode_s": round(decode_s, 4), "decode_steps": steps,
        "tokens_per_s": round(ids.shape[0] * steps / decode_s, 2) if decode_s > 0 else None} | steady(
        t, ids.shape[0])


def load_hf_default(device, dtype, folder=None):
    """transformers' SmolLM2: read from the GGUF itself (a conversion independent of prepare.py), or from
    the prepared folder (the same weights as ours; no GGUF needed)."""
    from transformers import AutoModelForCausalLM
    if folder:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        g = prepare.gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g),
                                                  dtype=dtype)
    return hf.to(device).eval()


# --- CPU suite
def peak_rss(args):
    """Peak resident memory (MiB) of one child process: ru_maxrss from wait4, in KiB on Linux."""
    p = subprocess.Popen([sys.executable, "infinigen.py"] + args, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return round(usage.ru_maxrss / 1024, 1), p.returncode


def default_text():
    names = sorted(os.listdir(LICENSES)) if os.path.isdir(LICENSES) else []
    files = (n for n in names if os.path.isfile(os.path.join(LICENSES, n)))
    name = "GPL-3" if "GPL-3" in names else next(files, None)
    if name is None:
        sys.exit(f"error: no text file in {LICENSES}; give one with --text")
    return os.path.join(LICENSES, name)


def suite_cpu(a):
    info = env_info()
    new, n_prompt = a.new_tokens or 128, a.prompt_tokens
    text = a.text or default_text()
    dev, dtype = torch.device("cpu"), torch.float32
    path = cli.writable(a.out or os.path.join(ROOT, "results", "bench-cpu.json"))
    for need in ("transformers", "gguf"):                    # before the minutes of runs, not after them
        if importlib.util.find_spec(need) is None:
            raise ValueError(f"--suite cpu compares with transformers reading the GGUF: it needs {need} "
                             "(make dev installs it)")
    folder = prepare.prepare()
    ids = I.Tok(folder).encode(cli.read_text(text, "--text"), chat=False)
    if len(ids) < n_prompt:                                  # before the minutes of runs, not after them
        raise ValueError(f"{text} has only {len(ids)} tokens, {n_prompt} needed")
    context = M.Config.from_hf(M.read_json(os.path.join(folder, "config.json"))).max_seq_len
    if n_prompt + new > context:
        raise ValueError(f"--prompt-tokens {n_prompt} + --new-tokens {new} exceed the model's context of "
                         f"{context} tokens")
    ids = ids[:n_prompt]

    say("peak resident memory of the demo command (a child process) ...")
    rss = {}
    for extra in ([], ["--policy", "infinigen"]):
        cmd = ["--max-new-tokens", "64"] + extra
        mib, rc = peak_rss(cmd)
        rss[" ".join(["python infinigen.py"] + cmd)] = {"peak_rss_mib": mib, "exit": rc}
        say(f"  python infinigen.py {' '.join(cmd)}: {mib} MiB (exit {rc})")

    say("loading our model and the transformers model (GGUF, float32) ...")
    model, folder = M.load(folder, dev, dtype)
    hf = load_hf_default(dev, dtype)
    say("warming up ...")
    ours(model, [ids[:16]], "full", 4)
    hf_generate(hf, torch.tensor([ids[:16]]), 4)

    rows, res = [], {}
    say(f"transformers generate: {n_prompt} prompt tokens, {new} new ...")
    hf_out, ref = hf_generate(hf, torch.tensor([ids]), new)
    res["transformers"] = ref
    for pol in ("full", "offload", "infinigen"):
        say(f"ours, policy {pol}: {n_prompt} prompt tokens, {new} new ...")
        out, s = ours(model, [ids], pol, new)
        agree = next((i for i, (x, y) in enumerate(zip(out[0], hf_out[0])) if x != y), len(out[0]))
        s["tokens_agree_with_transformers"] = agree    # greedy tokens equal up to here
        res[pol] = s
    for name, s in res.items():
        ratio = s["tokens_per_s"] / ref["tokens_per_s"] if s["tokens_per_s"] and ref["tokens_per_s"] else None
        s["ratio_vs_transformers"] = round(ratio, 3) if ratio else None
        rows.append({"impl": name if name == "transformers" else f"ours/{name}", **s})

    print(f"\nCPU decode, {info['cpu_model'] or info['processor']} x{info['cpu_count']}, batch 1, "
          f"{n_prompt} prompt + {new} new tokens, greedy, float32 (load avg {info['load_avg_at_start']})")
    table(rows, ["impl", "prefill_s", "decode_s", "decode_steps", "tokens_per_s", "ratio_vs_transformers",
                 "h2d_bytes_per_step", "tokens_agree_with_transformers"])
    print("\npeak resident memory (child process)")
    table([{"command": k, **v} for k, v in rss.items()], ["command", "peak_rss_mib", "exit"])
    write(path, {**info, "suite": "cpu", "model": folder, "text": text, "batch": 1, "prompt_tokens": n_prompt,
                 "new_tokens": new, "dtype": "float32", "results": res, "peak_rss": rss})


# --- Models for speed
SHAPES = {  # name -> Hugging Face config fields of a Llama; the rows the GPU suite runs by default
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=8192,
               rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024,
                 rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
ROWS = {"smollm2": "16x8192,32x4096", "7b": "8x4096,4x8192", "tiny": "2x128"}
DEFAULT_PER_SM = 0.25                       # kernel.PER_SM as it ships (kernel.py needs triton)
ROW_KEYS = ("tokens_per_s", "step_s", "h2d_bytes_per_step", "pcie_floor_s", "step_over_floor", "copy_wait_s")
POLICIES = "full,offload,infinigen:0.1,infinigen:0.2,h2o:0.1,hf-dynamic,hf-offloaded"


def real_default(device, dtype):
    """The prepared SmolLM2 with its transformers twin, or None (one line says why) when it cannot be made."""
    try:
        folder = prepare.prepare(quiet=True)
        model, _ = M.load(folder, device, dtype)
        return model, lambda: load_hf_default(device, dtype, folder)
    except (ImportError, FileNotFoundError) as e:
        say(f"the real SmolLM2 is not available here ({e}); random weights of its shape instead")
        return None


def random_model(name, device, dtype):
    """Ours with random weights of a named shape (N(0, 0.02), norms 1), and a maker of transformers' twin.
    Each is refused first (OffloadError) where memory cannot hold its weights."""
    hf = {"model_type": "llama", "hidden_act": "silu", **SHAPES[name]}
    cfg = M.Config.from_hf(hf)
    with torch.device("meta"):
        model = M.Transformer(cfg)
    params = sum(p.numel() for p in model.parameters())
    preflight(0, params * dtype.itemsize, device, what=f"{name}-shaped weights")
    model = model.to(dtype).to_empty(device=device)                   # made in dtype (float32 first: 2x)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02, generator=g)

    def twin():
        from transformers import LlamaConfig, LlamaForCausalLM
        preflight(0, params * 4, device, what=f"transformers' {name}-shaped weights")      # made in float32
        torch.manual_seed(0)
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**SHAPES[name])).to(dtype).eval()
    return model.eval(), twin


def models_for(name, device, dtype):
    """(our model, a maker of the transformers model, whether the weights are the real ones). A model that
    does not fit (refused by the preflight, or out of memory while it is made) is an OffloadError."""
    try:
        if name == "smollm2" and (real := real_default(device, dtype)):
            return (*real, True)
        return (*random_model(name, device, dtype), False)
    except Exception as e:
        if not cli.out_of_memory(e):
            raise
        why = one_line(e)
    free_memory()                                 # out of the except block, whose traceback held the tensors
    raise OffloadError(f"{name}: {why}")


# --- GPU suite
def pinned_h2d_bandwidth(dev, n=5, registered=False):
    """Bytes/s of host->device copies from a 1 GiB pinned tensor (None on a CPU: no link): pinned by torch's
    allocator (the link's figure, the floor's), or `registered` as the KV store is (offload.host_tensor),
    which an IOMMU may make slower."""
    if dev.type != "cuda":
        return None
    if registered:                          # what pinning costs a row: a 7B-shape store registers 16 GiB
        t = time.perf_counter()
        src = host_tensor((2**30,), torch.uint8, pin=True)
        say(f"  registering 1 GiB of host memory took {time.perf_counter() - t:.2f} s")
    else:
        src = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(dev)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        dst.copy_(src, non_blocking=True)
    b.record()
    b.synchronize()
    bw = n * src.numel() / (a.elapsed_time(b) / 1e3)
    del src, dst
    free_memory()
    return bw


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)     # pinned blocks go back too (CUDA builds)
        if host_empty is not None:
            host_empty()


def parse_policy(spec):
    """'infinigen:0.1' -> ('infinigen', 0.1); 'hf-dynamic' -> ('hf-dynamic', None)."""
    name, colon, budget = spec.partition(":")
    if name not in I.POLICIES + ("hf-dynamic", "hf-offloaded"):
        raise ValueError(f"unknown policy {name!r} in --policies")
    sparse = name not in ("full", "offload") and not name.startswith("hf")
    if colon and not sparse:
        raise ValueError(f"{name} keeps every token, it takes no budget: {spec!r} in --policies")
    try:
        b = float(budget) if colon else (0.2 if sparse else None)
    except ValueError:
        raise ValueError(f"bad budget in --policies: {spec!r}") from None
    if sparse:
        I.Policy(name, budget=b)                                           # its own check, one line
    return name, b


def parse_shapes(spec):
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in spec.split(",")]
    except ValueError:
        shapes = [()]
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes wants BATCHxCONTEXT,... (e.g. 8x4096), got {spec!r}")
    return shapes


def once(items, flag, spec):
    """Each of a comma list at most once: a row run twice would only take twice the time."""
    twice = next((i for i, x in enumerate(items) if x in items[:i]), None)
    if twice is not None:
        raise ValueError(f"{flag} names {spec.split(',')[twice].strip()!r} twice: {spec[:80]!r}")
    return items


def shapes_for(name, spec, new):
    """--shapes for a model: each context (prompt + new tokens) holds a prompt and `new` decoded tokens
    within the model's context (the same check for every suite)."""
    top = SHAPES[name]["max_position_embeddings"]
    shapes = once(parse_shapes(spec), "--shapes", spec)
    for B, ctx in shapes:
        if not new < ctx <= top:
            raise ValueError(f"--shapes {B}x{ctx}: {name}'s context must hold a prompt and {new} new tokens: "
                             f"from {new + 1} to {top} tokens")
    return shapes


def one_shape(shapes, suite):
    if len(shapes) > 1:
        raise ValueError(f"--shapes: the {suite} suite runs one shape, got {len(shapes)}")
    return shapes[0]


def peer_preflight(cfg, B, ctx, offloading, dev):
    """transformers keeps the whole KV on the device (DynamicCache) or in host memory (offloaded), with no
    check of its own: a host store larger than memory gets the process killed, so refuse it first."""
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * B * ctx              # float16
    layer = kv // cfg.n_layers
    act = B * min(ctx, 8192) * (cfg.dim + cfg.ffn_dim) * 2 * 2 + B * cfg.vocab_size * 4
    preflight(kv if offloading else 0, (2 * layer if offloading else kv) + act, dev, what="transformers KV")


def results_file(kind, device):
    """results/<kind>-<device>.json, the device's name in letters, digits and dashes (nvidia-h200, cpu)."""
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    return os.path.join(ROOT, "results", f"{kind}-{slug}.json")


NUMBER, TEXT = ((int, float, type(None)), "a number or null"), ((str, type(None)), "a string or null")
ROW_TYPES = {"model": ((str,), "a string"), "impl": ((str,), "a string"), "batch": ((int,), "an integer"),
             "context": ((int,), "an integer"), "budget": NUMBER, "skipped": TEXT, "error": TEXT, "run": TEXT,
             "cuda_graph": ((bool, type(None)), "true, false or null"), "gather_per_sm": NUMBER,
             "select_on": TEXT, "slots": TEXT,
             **{k: NUMBER for k in ROW_KEYS}}


def load_rows(path, fix=": move it away or give --out"):
    """The gpu suite's results file so far (a new one where there is none); checked before any row runs,
    each field a row has of the type the suite and the report read (a hand-edited or foreign file: one
    line naming the first field that is not)."""
    try:
        data = json.load(open(path)) if os.path.exists(path) else {"suite": "gpu", "runs": [], "rows": []}
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not readable JSON ({str(e)[:80]}){fix}") from None
    ok = isinstance(data, dict) and data.get("suite") == "gpu"
    if not (ok and isinstance(data.get("runs"), list) and isinstance(data.get("rows"), list)
            and all(isinstance(r, dict) for r in data["runs"] + data["rows"])):
        raise ValueError(f"{path} is not a results file of the gpu suite{fix}")
    for i, r in enumerate(data["rows"]):
        for k, (t, what) in ROW_TYPES.items():
            v = r.get(k)
            ok = isinstance(v, t) and (type(v) not in (int, bool) or bool in t or cli.json_number(v))
            if not ok and (k in ("model", "impl", "batch", "context") or k in r):
                value = json.dumps(r.get(k))[:40]
                raise ValueError(f"{path}: row {i + 1} has {k} = {value}, not {what}{fix}")
    bw = lambda v: v is None or cli.json_number(v)
    if not all(bw(r.get("pinned_h2d_bytes_per_s")) and isinstance(r.get("date"), str)
               for r in data["runs"]):
        raise ValueError(f"{path}: a run's date or pinned_h2d_bytes_per_s is not what the suite writes{fix}")
    return data


def save_row(path, run, row):
    """Add (or replace) one row in the results file, written whole each time."""
    data = load_rows(path)
    if not data["runs"] or data["runs"][-1] != run:
        data["runs"] = [r for r in data["runs"] if r["date"] != run["date"]] + [run]
    key = lambda r: (r["model"], r["impl"], r.get("budget"), r["batch"], r["context"], r.get("gather"), r.get(
        "cuda_graph"), r.get("gather_per_sm", DEFAULT_PER_SM), r.get("select_on", "compute"),
        r.get("slots", "torch"))
    data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
    write_json(path, data)


class RowsFailed(Exception):
    """Rows of ours that ended in an error (a bug, not a lack of memory): the run fails, after the rest."""


def one_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def measure(fn, args, row, bw, peer=False):
    """Run one row. Out of memory (device or host) or refused by a preflight is that row's result; so is
    any error of the transformers peer (its row says so, its traceback is printed). Any other error of ours
    is a bug: its traceback is printed, its row says `error`, the other rows still run, and the run fails at
    the end (RowsFailed). A device that cannot even be cleaned up after the row (a sticky CUDA error, as an
    illegal address leaves) can run no more rows: the row says `error` and `fatal`."""
    t0 = time.perf_counter()
    try:
        s = fn(*args)
    except Exception as e:
        if isinstance(e, OffloadError) or cli.out_of_memory(e):
            s = {"skipped": one_line(e)}
        else:
            traceback.print_exc()
            s = {"skipped": "peer error: " + one_line(e)} if peer else {"error": one_line(e)}
    try:
        free_memory()
    except RuntimeError as e:
        traceback.print_exc()
        s = {"error": s.get("error") or one_line(e), "fatal": True}
    took = f"{time.perf_counter() - t0:.0f} s"
    row.update({k: None for k in ROW_KEYS} | s)
    row["copy_wait_s"] = row.pop("copy_wait_per_step_s", None)           # a row's wait is per decode step
    if "skipped" in s or "error" in s:
        say(f"    {'skipped' if 'skipped' in s else 'ERROR'}: {s.get('skipped') or s['error']} ({took})")
        return row
    h2d = s.get("h2d_bytes_per_step")
    step = s.get("steady_step_s") or (s["decode_s"] / s["decode_steps"] if s["decode_steps"] else None)
    row["tokens_per_s"] = s.get("steady_tokens_per_s", row["tokens_per_s"])     # the warm-up steps left out
    floor = h2d / bw if h2d and bw else None
    row.update(step_s=round(step, 5) if step else None, pcie_floor_s=round(floor, 5) if floor else None,
               step_over_floor=round(step / floor, 4) if step and floor else None)
    say(f"    {row.get('tokens_per_s')} tok/s, step {row['step_s']} s, floor {row['pcie_floor_s']} s "
        f"(the row took {took})")
    return row


def run_ours(model, shape, pol, new, cuda):
    """Our generate on random prompts of `shape` (B, context), stamped after each forward as hf_generate
    stamps transformers' (a sync on CUDA)."""
    ids, t = prompts_for(model.cfg, *shape, new), []

    def stamp(_):
        if cuda:
            torch.cuda.synchronize()
        t.append(time.perf_counter())
    s = ours(model, ids.tolist(), pol, new, time_copies=cuda, on_token=stamp)[1] | steady(t, ids.shape[0])
    return s | device_gather_setting(s.get("gather"), pol.name)


def device_gather_setting(gather, policy):
    """How a policy's device gather ran, for its row: the kernel's grid (kernel.PER_SM); nothing for the host
    gather, or `offload` (whole blocks). And how InfiniGen's and the oracle's top-k selections ran
    (skew.SLOTS). Rows of the third GPU run may also say `select_on`: "copy" ran the device gather's
    selections on the copy stream, an option since removed."""
    slots = {"slots": SK.SLOTS} if policy in ("infinigen", "oracle") else {}
    if gather != "device" or policy == "offload":
        return slots
    return {"gather_per_sm": sys.modules["kernel"].PER_SM} | slots


def no_cudnn_attention():
    """torch's attention kernels but cuDNN's, which torch 2.11 picks on Hopper and which builds a new plan
    for every new key length, each decode step of transformers' cache (tens of ms; ours keep fixed shapes):
    the peer runs at its best (the 2026-12-04 H200 rows ran with it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def make_peer(make_twin, dev):
    """transformers' model, warmed up; or the exception that stopped it (each peer row then says so)."""
    try:
        hf = make_twin()
        with no_cudnn_attention():
            hf_generate(hf, torch.arange(64, device=dev)[None], 4)
        return hf
    except Exception as e:
        free_memory()
        return e


def run_peer(hf, cfg, shape, new, offloading, dev):
    """transformers' generate with a DynamicCache on random prompts of `shape` (B, context), on the device
    or offloaded to the CPU."""
    from transformers import DynamicCache
    if isinstance(hf, Exception):                   # the model itself could not be made
        raise hf
    if offloading and dev.type != "cuda":
        raise OffloadError("transformers offloads to the CPU from a GPU only")
    B, ctx = shape
    peer_preflight(cfg, B, ctx, offloading, dev)
    ids = prompts_for(cfg, B, ctx, new)
    cache = DynamicCache(config=hf.config, offloading=offloading)
    with no_cudnn_attention():
        s = hf_generate(hf, ids.to(dev), new, cache)[1]
    if offloading:   # estimated: every layer's whole past comes back each step (mean past length)
        kv_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2
        s.update(h2d_bytes_per_step=kv_token * B * (ids.shape[1] + new // 2), h2d_estimated=True)
    return s


def prompts_for(cfg, B, ctx, new):
    """Random prompts (B, ctx - new): refused, as the row's result, where they could not be held (they
    become Python lists for our generate: about 40 bytes a token)."""
    preflight(40 * B * ctx, 0, torch.device("cpu"), "prompt")
    return torch.randint(0, cfg.vocab_size, (B, ctx - new), generator=torch.Generator().manual_seed(B * ctx))


def suite_gpu(a):
    dev = cli.device_of(a.device or "auto")
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    info = env_info() | {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                         "dtype": str(dtype)[6:]}
    new = a.new_tokens or 16
    pols = once([parse_policy(p) for p in a.policies.split(",")], "--policies", a.policies)
    models = once((a.models or "smollm2,7b").split(","), "--models", a.models or "")
    for name in models:
        if name not in SHAPES:
            raise ValueError(f"unknown model {name!r} (choose from {', '.join(SHAPES)})")
    shapes = {name: shapes_for(name, a.shapes or ROWS[name], new) for name in models}
    path = cli.writable(a.out or results_file("bench" if info["device"] != "cpu" else "bench-gpu-suite",
                                              info["device"]))
    load_rows(path)                                    # a file it cannot add to fails now, not after a row
    say("measuring pinned host->device bandwidth (1 GiB) ..." if cuda else "on a CPU: no PCIe link, no floor")
    bw, reg = pinned_h2d_bandwidth(dev), pinned_h2d_bandwidth(dev, registered=True)
    if bw:
        say(f"  {bw / 1e9:.1f} GB/s (the floors'); {reg / 1e9:.1f} GB/s from registered memory (the store's)")
    run = info | {"pinned_h2d_bytes_per_s": round(bw) if bw else None,
                  "registered_h2d_bytes_per_s": round(reg) if reg else None, "new_tokens": new}
    rows = []

    def record(fn, args, row, peer=False):  # one row, measured and saved at once
        rows.append(measure(fn, args, row, bw, peer))
        save_row(path, run, rows[-1])
        if rows[-1].get("fatal"):
            raise RowsFailed(f"the device broke in {row['impl']} {row['batch']}x{row['context']} and can run "
                             f"no more rows ({rows[-1]['error']}); the rows so far are in {path}")
    for name in models:
        try:
            model, make_twin, real = models_for(name, dev, dtype)
        except OffloadError as e:                       # the model does not fit: each of its rows says so
            def refused(e=e):
                raise e
            for pol, budget in pols:
                for B, ctx in shapes[name]:
                    say(f"  {name} {pol} {budget or ''} batch {B} context {ctx} ...")
                    row = {"model": name, "impl": pol, "budget": budget, "batch": B, "context": ctx,
                           "run": run["date"]}
                    record(refused, (), row)
            continue
        cfg, label = model.cfg, name if real or name != "smollm2" else "smollm2-random"
        for pol, budget in [p for p in pols if not p[0].startswith("hf")]:
            p = I.Policy(pol, **({"budget": budget} if budget is not None else {}), gather=a.gather,
                         graphs=a.graphs)
            say(f"{label}: warming up {pol} ...")
            ours(model, [list(range(64))], p, 4)
            for B, ctx in shapes[name]:
                say(f"  {label} {pol} {budget or ''} batch {B} context {ctx} ...")
                row = {"model": label, "impl": pol, "budget": budget, "batch": B, "context": ctx,
                       "run": run["date"]}
                record(run_ours, (model, (B, ctx), p, new, cuda), row)
        model = None
        free_memory()
        peers = [p for p, _ in pols if p.startswith("hf")]
        if not peers:
            continue
        hf = make_peer(make_twin, dev)
        for impl in peers:
            for B, ctx in shapes[name]:
                say(f"  {label} {impl} batch {B} context {ctx} ...")
                row = {"model": label, "impl": impl, "budget": None, "batch": B, "context": ctx,
                       "run": run["date"]}
                args = (hf, cfg, (B, ctx), new, impl == "hf-offloaded", dev)
                record(run_peer, args, row, peer=True)
        hf = None
        free_memory()
    print(f"\n{info['device']}, {info['dtype']}, {new} new tokens"
          + (f", pinned H2D {bw / 1e9:.1f} GB/s (registered: {reg / 1e9:.1f})" if bw else ""))
    table(rows, ["model", "impl", "budget", "batch", "context", "tokens_per_s", "h2d_bytes_per_step",
                 "pcie_floor_s", "step_s", "step_over_floor", "copy_wait_s", "cuda_graph", "skipped"])
    say(f"wrote {path}")
    failed = [r for r in rows if r.get("error")]
    if failed:
        f = failed[0]
        raise RowsFailed(f"{len(failed)} of {len(rows)} rows failed (their tracebacks are above), the first: "
                         f"{f['impl']} {f['batch']}x{f['context']}: {f['error']}")


# --- Report: a results file of the gpu suite as the README's table, and issue 10's targets
def best(rows, model, impl, budget, shape):
    """The fastest measured row of impl (at budget) on model at shape (B, context): graphs or not."""
    got = [r for r in rows if r["model"].split("-")[0] == model and r["impl"] == impl
           and r.get("budget") == budget and (r["batch"], r["context"]) == shape and r.get("tokens_per_s")
           and r.get("gather_per_sm") in (None, DEFAULT_PER_SM) and r.get("select_on") in (None, "compute")
           and r.get("slots", "torch") == SK.SLOTS]
    return max(got, key=lambda r: r["tokens_per_s"], default=None)


def targets(rows):
    """Issue 10's targets: (what, measured or None where a row is missing or skipped, goal, met or None)."""
    def row(model, impl, budget=None):
        return best(rows, model, impl, budget, (8, 4096) if model == "7b" else (32, 4096))

    def per(a, b):                                                       # tokens/s of a over b
        return a["tokens_per_s"] / b["tokens_per_s"] if a and b else None

    def floor(r):                                                        # step / its PCIe floor
        return r and r.get("step_over_floor")
    ig, sg, so = row("7b", "infinigen", 0.1), row("smollm2", "infinigen", 0.1), row("smollm2", "offload")
    out = [("7B 8x4096, infinigen 0.1: step / its PCIe floor", floor(ig), "<=", 1.3),
           ("7B 8x4096, infinigen 0.1: tokens/s / transformers' DynamicCache on the GPU",
            per(ig, row("7b", "hf-dynamic")), ">=", 2.5),
           ("7B 8x4096, infinigen 0.1: tokens/s / transformers offloaded", per(ig, row("7b", "hf-offloaded")),
            ">=", 15),
           ("7B 8x4096, infinigen 0.2: step / its PCIe floor", floor(row("7b", "infinigen", 0.2)), "<=", 1.3),
           ("SmolLM2 32x4096, infinigen 0.1: tokens/s / our offload", per(sg, so), ">=", 5),
           ("SmolLM2 32x4096, infinigen 0.1: step / its PCIe floor", floor(sg), "<=", 2),
           ("SmolLM2 32x4096, offload: share of the pinned bandwidth", floor(so) and 1 / floor(so), ">=",
            0.85)]
    for model, shape in sorted({(r["model"].split("-")[0], (r["batch"], r["context"])) for r in rows}):
        full, peer = best(rows, model, "full", None, shape), best(rows, model, "hf-dynamic", None, shape)
        if full and peer:                                                # every shape where both ran
            out.append((f"{model} {shape[0]}x{shape[1]}, full: tokens/s / transformers' DynamicCache",
                        per(full, peer), ">=", 1))
    met = lambda v, op, goal: None if v is None else v <= goal if op == "<=" else v >= goal
    return [(what, v, f"{op} {goal}", met(v, op, goal)) for what, v, op, goal in out]


def grid_note(per_sm, select_on=None, slots=None):  # a row whose gather ran on another grid, or selected
    grid = "" if per_sm in (None, DEFAULT_PER_SM) else (                    # elsewhere, or otherwise
        " (gather: a program per block of rows)" if per_sm == 0 else f" (gather: {per_sm} per SM)")
    return (grid + (" (selection on the copy stream)" if select_on == "copy" else "")
            + {"kernel": " (top-k: one kernel)", "fused": " (speculation fused)"}.get(slots, ""))


def suite_report(a):
    if not a.results:
        raise ValueError("--suite report reads a results file: give --results FILE")
    if not os.path.isfile(a.results):
        raise ValueError(f"no results file {a.results}")
    data = load_rows(a.results, fix="")
    num = lambda v, f="{:.2f}", scale=1: "–" if v is None else f.format(v * scale)
    cell = lambda v: " ".join(str(v).split()).replace("|", "\\|")          # one line, one table cell
    for run in data["runs"]:
        bw = run.get("pinned_h2d_bytes_per_s")
        tf = f", transformers {run['transformers']}" if run.get("transformers") else ""   # its peer rows
        print(cell(f"{run.get('device')}, {run.get('dtype')}, torch {run.get('torch')}{tf}, "
                   f"{run.get('date')}: `{run.get('command')}`, pinned H2D {num(bw, '{:.1f}', 1e-9)} GB/s"
                   f" (registered: {num(run.get('registered_h2d_bytes_per_s'), '{:.1f}', 1e-9)})"))
    print("\n| model | batch × context | impl | graph | tokens/s | step ms | H2D MB/step | floor ms | "
          "step / floor | copy wait ms/step |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        impl = cell(r["impl"] + (f" {r['budget']}" if r.get("budget") is not None else "")
                    + grid_note(r.get("gather_per_sm"), r.get("select_on"), r.get("slots")))
        head = f"| {cell(r['model'])} | {r['batch']} × {r['context']} | {impl} |"
        if r.get("skipped") or r.get("error"):
            why = cell("skipped: " + r["skipped"] if r.get("skipped") else "ERROR: " + r["error"])
            print(f"{head} | {why} | | | | | |")
            continue
        graph = {True: "yes", False: "no"}.get(r.get("cuda_graph"), "–")
        cells = [graph, num(r.get("tokens_per_s"), "{:.1f}"), num(r.get("step_s"), "{:.1f}", 1e3),
                 num(r.get("h2d_bytes_per_step"), "{:.1f}", 1e-6), num(r.get("pcie_floor_s"), "{:.1f}", 1e3),
                 num(r.get("step_over_floor")), num(r.get("copy_wait_s"), "{:.1f}", 1e3)]
        print(f"{head} {' | '.join(cells)} |")
    print("\n| target (issue 10) | measured | goal | met |\n|---|---|---|---|")
    for what, v, goal, met in targets(data["rows"]):
        print(f"| {what} | {num(v)} | {goal} | {'–' if met is None else 'yes' if met else '**no**'} |")


# --- Gather: the kernel against the host path
def sdpa_backend(q, k, v, mask, gqa):
    """The fused attention kernel torch picks for these shapes (its own dispatch, nothing run)."""
    from torch.nn.attention import SDPBackend
    c = torch._fused_sdp_choice(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=None,
                                enable_gqa=gqa)
    return str(SDPBackend(c)).split(".")[-1]


def suite_gather(a):
    """Bring 5-20% of a layer's rows from a pinned store to the device with the engine's two gathers
    (KVStore.fetch, host and device) and report GB/s of useful bytes, per row width (K and V together:
    128, 256, 512 bytes at float16); and which attention kernel decode's shapes get."""
    dev = cli.device_of(a.device or "auto")
    cuda, dtype = dev.type == "cuda", torch.float16
    B, S = one_shape(parse_shapes(a.shapes or "8x4096"), "gather")
    Hkv, gathers = 32, [a.gather] if a.gather != "auto" else ["host", "device"] if cuda else ["host"]
    info = env_info() | {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "batch": B,
                         "slots": S, "kv_heads": Hkv, "rows": [], "sdpa": {}}
    bw, reg = pinned_h2d_bandwidth(dev), pinned_h2d_bandwidth(dev, registered=True)
    info["pinned_h2d_bytes_per_s"] = round(bw) if bw else None
    info["registered_h2d_bytes_per_s"] = round(reg) if reg else None       # the store's kind of memory
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    path = cli.writable(a.out or results_file("gather", info["device"]))
    kernel = sys.modules["kernel"] if "device" in gathers and device_kernel("gather_rows") else None
    grids = {"host": [None], "device": [DEFAULT_PER_SM, 0.5, 1, 4, 0]}   # the kernel's programs per SM
    for gather, per_sm in [(g, k) for g in gathers for k in grids[g]]:   # the host's rows first: a failing
        if kernel:                                                         # kernel cannot take them along
            kernel.PER_SM = DEFAULT_PER_SM if per_sm is None else per_sm
        for d in (32, 64, 128):
            store = KVStore(1, B, S, Hkv, d, dev, dtype, gather=gather)
            gen = torch.Generator(dev).manual_seed(d)                       # made on the device: fast
            store.kv.copy_(torch.randn(store.kv.shape, generator=gen, device=dev, dtype=dtype))
            for frac in (0.05, 0.1, 0.2):
                n = max(1, int(frac * S))
                g = torch.Generator().manual_seed(n)
                idx = torch.rand(B, Hkv, S, generator=g).argsort(-1)[..., :n].sort(-1).values.to(dev)
                ok = torch.ones(B, Hkv, n, dtype=torch.bool, device=dev)
                for _ in range(2):                                           # warm up (compiles the kernel)
                    store.take(store.fetch(0, S, idx, ok))
                sync()
                reps, t = 5 if cuda else 2, time.perf_counter()
                for _ in range(reps):
                    store.take(store.fetch(0, S, idx, ok))
                    store.step_done()
                sync()
                dt = (time.perf_counter() - t) / reps
                useful = B * Hkv * n * store.row_bytes
                row = {"row_bytes": store.row_bytes, "fraction": frac, "gather": gather, "per_sm": per_sm,
                       "ms": round(dt * 1e3, 3), "useful_gb_per_s": round(useful / dt / 1e9, 2),
                       "of_pinned_bandwidth": round(useful / dt / bw, 3) if bw else None}
                info["rows"].append(row)
                write_json(path, info)                                   # a run cut short keeps its rows
                say(f"  rows of {store.row_bytes} B, {frac:.0%}, {gather}{grid_note(per_sm)}: "
                    f"{row['ms']} ms, {row['useful_gb_per_s']} GB/s")
            store = None
            free_memory()
    for name, (H, Hkv, d, n) in {"7b": (32, 32, 128, 820), "smollm2": (9, 3, 64, 820)}.items():
        q = torch.randn(B, H, 1, d, device=dev, dtype=dtype)
        k = torch.randn(B, Hkv, n, d, device=dev, dtype=dtype)
        mask = torch.rand(B, Hkv, 1, n, device=dev) < 0.9
        G = H // Hkv
        info["sdpa"][name] = {
            "gqa_with_mask": sdpa_backend(q, k, k, mask.repeat_interleave(G, 1), G > 1),
            "folded_into_queries": sdpa_backend(q.view(B, Hkv, G, d), k, k, mask.expand(B, Hkv, G, n), False)}
        say(f"  decode attention, {name} shape: {info['sdpa'][name]}")
    if kernel:
        info["beside_compute"] = []
        for k in (DEFAULT_PER_SM, 0.5, 1, 0):
            info["beside_compute"].append(beside_compute(kernel, k, dev, B, S, Hkv))
            write_json(path, info)                                       # a run cut short keeps its rows
        kernel.PER_SM = DEFAULT_PER_SM
    table(info["rows"], ["row_bytes", "fraction", "gather", "per_sm", "ms", "useful_gb_per_s",
                         "of_pinned_bandwidth"])
    if info.get("beside_compute"):
        table(info["beside_compute"], ["per_sm", "gather_ms", "compute_ms", "both_ms", "overlap"])
    write_json(path, info)
    say(f"wrote {path}")


def beside_compute(kernel, per_sm, dev, B, S, Hkv, layers=8):
    """The device gather (rows of 512 B, 10% of a layer) on the copy stream while matmuls of about its
    length run on the compute stream, as in a decode step: layer i+1's fetch, layer i's matmuls, then the
    wait for the rows. ms per layer of each alone and of both; overlap = (gather + compute - both) / the
    shorter: 1 when the shorter hid entirely under the longer, 0 when they took turns."""
    kernel.PER_SM = per_sm
    store = KVStore(1, B, S, Hkv, 128, dev, torch.float16, gather="device")
    n = S // 10
    idx = torch.rand(B, Hkv, S, device=dev).argsort(-1)[..., :n].sort(-1).values
    ok = torch.ones(B, Hkv, n, dtype=torch.bool, device=dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda dev: None)
    x = torch.randn(B, 4096, device=dev, dtype=torch.float16 if cuda else torch.float32)
    w = torch.randn(4096, 16384 if cuda else 256, device=dev, dtype=x.dtype)

    def per_layer(gather, reps):                  # ms per layer: `reps` matmuls beside (or without) a gather
        for _ in range(2):                        # the first round warms up
            sync(dev)
            t = time.perf_counter()
            for _ in range(layers):
                h = store.fetch(0, S, idx, ok) if gather else None
                for _ in range(reps):
                    x @ w
                if h:
                    store.take(h)
            store.step_done()
            sync(dev)
        return (time.perf_counter() - t) / layers * 1e3
    g, one = per_layer(True, 0), per_layer(False, 1)
    reps = max(1, round(g / one))                                        # matmuls about as long as the gather
    m = per_layer(False, reps)
    both = per_layer(True, reps)
    row = {"per_sm": per_sm, "row_bytes": store.row_bytes, "fraction": 0.1, "matmuls": reps,
           "gather_ms": round(g, 3), "compute_ms": round(m, 3), "both_ms": round(both, 3),
           "overlap": round((g + m - both) / min(g, m), 3)}
    say(f"  beside compute{grid_note(per_sm)}: gather {row['gather_ms']} ms, compute {row['compute_ms']} ms, "
        f"both {row['both_ms']} ms per layer (overlap {row['overlap']})")
    store = None
    free_memory()
    return row


# --- Profile: where a decode step's device time goes, kernel by kernel
def one_model(a, suite, new, which):
    """A suite of one model on one shape: the device, float16 on CUDA (else float32), the model's name and
    (B, context); the shape by default 1x1024 on a CPU, else the model's `which`-th default row."""
    dev = cli.device_of(a.device or "auto")
    cuda = dev.type == "cuda"
    name = a.models or "smollm2"
    if name not in SHAPES:
        raise ValueError(f"--models: the {suite} takes one model, one of {', '.join(SHAPES)}; got {name!r}")
    shape = a.shapes or ("1x1024" if not cuda else ROWS[name].split(",")[which])
    B, ctx = one_shape(shapes_for(name, shape, new), suite)
    dtype = getattr(torch, getattr(a, "dtype", None) or ("float16" if cuda else "float32"))
    return dev, cuda, dtype, name, B, ctx


VIEWS = set("view _unsafe_view _reshape_alias reshape expand slice select permute transpose t unsqueeze "
            "squeeze as_strided alias detach split split_with_sizes unbind lift_fresh".split()   # (views)
            + ["record_stream", "promote_types", "scalar_tensor"])  # no kernel (scalar_tensor: a host number)


def count_ops(step):
    """The tensor operations one call of step() runs that launch a kernel on a GPU (views do not), counted
    by name on any device, with the CPU's own bound checks off (skew.CHECK_BOUNDS: a GPU has none). The
    gather and put kernels are not in it (under the CPU's interpreter their insides run as tensor
    operations; on a GPU they are one launch each per offloaded layer)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode
    kernel_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.py")

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name, f = func.overloadpacket.__name__, sys._getframe(1)
            while f is not None and f.f_code.co_filename != kernel_py:
                f = f.f_back
            if name not in VIEWS and f is None:
                seen[name] += 1
            return func(*args, **(kwargs or {}))
    seen, checks = Counter(), SK.CHECK_BOUNDS
    SK.CHECK_BOUNDS = False
    try:
        with Count():
            step()
    finally:
        SK.CHECK_BOUNDS = checks
    return seen


def suite_profile(a):
    """One decode step of each policy, op by op, under torch's profiler: the device time of every kernel
    (CUDA) or the self time of every op (CPU) summed by name over the step, the largest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    dev, cuda, dtype, name, B, ctx = one_model(a, "profile", 4, -1)
    pols = once([parse_policy(p) for p in a.policies.split(",")], "--policies", a.policies)
    if any(p.startswith("hf") for p, _ in pols):
        raise ValueError("--policies: the profile runs the engine's policies, not transformers'")
    device_name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    path = cli.writable(a.out or results_file(f"profile-{name}", device_name))
    model, _, real = models_for(name, dev, dtype)
    ids = torch.randint(0, model.cfg.vocab_size, (B, ctx - 4), generator=torch.Generator().manual_seed(0))
    out = env_info() | {"device": device_name, "model": name, "real_weights": real, "batch": B,
                        "context": ctx, "dtype": str(dtype).split(".")[1], "slots": SK.SLOTS, "policies": {}}
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    for pol, budget in pols:
        say(f"profile: {pol} {budget or ''}, batch {B}, context {ctx} ...")
        p = I.Policy(pol, **({"budget": budget} if budget is not None else {}), gather=a.gather, graphs=False)
        cache = I.make_cache(model, p, B, ctx)
        I.prefill(model, cache, ids.to(dev), torch.ones(ids.shape, dtype=torch.bool))
        tok = ids[:, -1].to(dev)
        for _ in range(2):                                               # warm up
            I.decode_one(model, cache, tok)
        ops = count_ops(functools.partial(I.decode_one, model, cache, tok))     # a third step, counted
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            I.decode_one(model, cache, tok)
            sync()
        where = DeviceType.CUDA if cuda else DeviceType.CPU
        us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        spent = sorted(((us(e), e.count, e.key) for e in prof.key_averages() if e.device_type == where
                        and us(e) > 0 and not getattr(e, "is_user_annotation", False)), reverse=True)
        total = sum(t for t, _, _ in spent)
        out["policies"][f"{pol} {budget}" if budget is not None else pol] = {
            "total_ms": round(total / 1e3, 3), "kernels": len(spent), "launches": sum(c for _, c, _ in spent),
            "ops": sum(ops.values()), "ops_by_name": dict(ops.most_common()),
            "top": [{"name": k[:100], "ms": round(t / 1e3, 3), "count": c, "share": round(t / total, 3)}
                    for t, c, k in spent[:15]]}
        say(f"  {total / 1e3:.2f} ms of {'kernels' if cuda else 'ops'} in one step, "
            f"{out['policies'][list(out['policies'])[-1]]['launches']} {'launches' if cuda else 'calls'}, "
            f"{sum(ops.values())} tensor operations that launch a kernel on a GPU; the largest:")
        for t, c, k in spent[:8]:
            say(f"    {t / 1e3:8.3f} ms  {c:5d} x  {k[:90]}")
        write_json(path, out)
        cache = None
        free_memory()
    say(f"wrote {path}")


# --- Timeline
TRACED = 6                                 # decode steps after the prompt: 2 to warm up, 3 timed, 1 traced


def suite_timeline(a):
    """Traced decode steps of `offload` and `infinigen`: when each layer computed (compute stream) and
    when each layer's K, V copy ran (copy stream, or the host on a CPU); the copy wait of each step."""
    from offload import mark
    dev, cuda, dtype, name, B, ctx = one_model(a, "timeline", TRACED, 0)
    device_name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    path = cli.writable(a.out or results_file("timeline", device_name))
    png = cli.writable(os.path.splitext(path)[0] + ".png", "timeline picture")
    if png == path:
        raise ValueError(f"--out {a.out}: the timeline's picture takes that name with .png: give a .json")
    model, _, real = models_for(name, dev, dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (B, ctx - TRACED), generator=gen).to(dev)
    out = {"device": device_name, "model": name, "real_weights": real,
           "batch": B, "context": ctx, "prompt": ctx - TRACED,
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["python"] + sys.argv), "runs": {},
           "note": "CUDA: copy-stream and compute-stream events, so overlap is real concurrency" if cuda else
           "CPU: host clock; a copy inside the previous layer's span ran serially within it, "
           "not concurrently"}
    for pol in ("offload", "infinigen"):
        say(f"timeline: {pol}, batch {B}, context {ctx} ...")
        cache = I.make_cache(model, I.Policy(pol, gather=a.gather), B, ctx)
        cache.store.timing = cuda
        I.prefill(model, cache, ids, torch.ones(ids.shape, dtype=torch.bool))
        tok = ids[:, -1]
        for _ in range(2):                                           # warm up
            I.decode_one(model, cache, tok)
        waits = []
        for _ in range(3):                                           # the copy wait of whole steps
            before = cache.store.ledger.wait_s
            I.decode_one(model, cache, tok)
            waits.append(round((cache.store.ledger.wait_s - before) * 1e3, 3))
        marks = []
        hooks = [b.register_forward_pre_hook(lambda m, x, i=i, ms=marks: ms.append(("start", i, mark(cuda))))
                 for i, b in enumerate(model.layers)]
        hooks += [b.register_forward_hook(lambda m, x, y, i=i, ms=marks: ms.append(("end", i, mark(cuda))))
                  for i, b in enumerate(model.layers)]
        cache.store.trace, attn, plain = [], [], M.attention

        def timed_attention(*args, plain=plain, attn=attn):          # layer order = call order
            start = mark(cuda)
            out = plain(*args)
            attn.append((len(attn), start, mark(cuda)))
            return out
        M.attention = timed_attention
        t0, before = mark(cuda), cache.store.ledger.wait_s
        try:
            I.decode_one(model, cache, tok)
        finally:
            M.attention = plain
        wait = (cache.store.ledger.wait_s - before) * 1e3                 # the traced step's own copy wait
        for h in hooks:
            h.remove()
        if cuda:
            torch.cuda.synchronize(dev)
        ms = (lambda e, t0=t0: t0.elapsed_time(e)) if cuda else (lambda t, t0=t0: (t - t0) * 1e3)
        starts = {i: ms(e) for k, i, e in marks if k == "start"}
        layers = [(i, starts[i], ms(e)) for k, i, e in marks if k == "end"]
        copies = [(i, ms(s), ms(e)) for _, i, s, e in cache.store.trace]
        overlap = sum(max(0.0, min(ce, le) - max(cs, ls)) for ci, cs, ce in copies
                      for li, ls, le in layers if li == ci - 1)      # copy of i+1 during layer i
        step = max(e for _, _, e in layers + copies)
        attention = sum(ms(e) - ms(s) for _, s, e in attn)
        copy = sum(e - s for _, s, e in copies)
        out["runs"][pol] = {"budget": None if pol == "offload" else cache.pol.budget, "cuda_graph": False,
                            "layers_ms": layers, "copies_ms": copies,
                            "attention_ms": [(i, ms(s), ms(e)) for i, s, e in attn], "copy_ms": copy,
                            "copy_during_previous_layer_ms": overlap, "step_ms": step,
                            "copy_wait_ms_per_step": waits, "gather": cache.store.gather,
                            **device_gather_setting(cache.store.gather, pol),
                            "breakdown_ms": {"step": round(step, 3), "attention": round(attention, 3),
                                             "copy": round(copy, 3), "copy_wait": round(wait, 3),
                                             "rest": round(step - attention - wait, 3)}}
        say(f"  step {step:.2f} ms; copies {out['runs'][pol]['copy_ms']:.2f} ms in all, {overlap:.2f} ms "
            f"of it during the previous layer; copy wait per step {waits} ms; "
            f"breakdown {out['runs'][pol]['breakdown_ms']}")
        out["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json(path, out)                                    # a run cut short keeps the first policy
        cache = None                                             # its store goes before the next is made
        free_memory()
    say(f"wrote {path}")
    plot_timeline(out, png)


def plot_timeline(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(11, 4.2))
    for ax, (pol, run) in zip(axes, out["runs"].items()):
        for row, spans in ((1, run["layers_ms"]), (0, run["copies_ms"])):
            ax.broken_barh([(s, e - s) for _, s, e in spans], (row - 0.4, 0.8),
                           facecolors=[plt.cm.tab20(i % 20) for i, _, _ in spans])
        wait = run["copy_wait_ms_per_step"]
        ax.set(yticks=[0, 1], yticklabels=["copy", "compute"],
               title=f"{pol} ({run['gather']} gather): one decode step on {out['device']}, "
                     f"B={out['batch']}, context {out['context']}; compute waited "
                     f"{sum(wait) / len(wait):.2f} ms per step for copies")
    axes[-1].set_xlabel("ms (colour = layer; layer i+1's copy runs under layer i)")
    fig.tight_layout()
    with cli.whole(path) as tmp:
        fig.savefig(tmp, dpi=90)
    say(f"wrote {path}")


# --- Command line
USES = {"cpu": ("text", "prompt_tokens", "new_tokens", "out"),      # the flags each suite reads
        "gpu": ("new_tokens", "models", "shapes", "policies", "gather", "graphs", "device", "out",
                "gather_per_sm", "slots"),
        "timeline": ("models", "shapes", "gather", "device", "out", "gather_per_sm"),
        "gather": ("shapes", "gather", "device", "out"), "report": ("results",),
        "profile": ("models", "shapes", "policies", "gather", "device", "out", "slots", "dtype")}
PROFILED = "full,infinigen:0.1"                                     # the profile suite's policies
DEFAULTS = {"prompt_tokens": 512, "policies": POLICIES, "gather": "auto", "graphs": True}


def check_flags(a):
    """Refuse a flag the suite does not read (never ignored; `--device cpu` goes with the cpu suite) and
    --new-tokens 1 (no decode step to time); then fill in the defaults."""
    for k, v in vars(a).items():
        if v is None or k == "suite" or k in USES[a.suite] or (a.suite, k, v) == ("cpu", "device", "cpu"):
            continue
        flag = "--no-graphs" if k == "graphs" else "--" + k.replace("_", "-")
        users = ", ".join(s for s, ks in USES.items() if k in ks)
        raise ValueError(f"{flag} is not used by the {a.suite} suite (only by {users})")
    if a.new_tokens == 1:
        raise ValueError("--new-tokens 1 leaves no decode step to time: give at least 2")
    cuda = a.device != "cpu" and torch.cuda.is_available()             # where the suite's rows run
    if a.gather_per_sm is not None and (a.gather == "host" or a.gather in (None, "auto") and not cuda):
        raise ValueError("--gather-per-sm sets the device gather's grid, but these rows gather on the host "
                         "(--gather host, or auto without CUDA): give --gather device")
    if a.graphs is False and not cuda:
        raise ValueError("--no-graphs: CUDA graphs are captured on CUDA only; these rows run on the CPU")
    empty = next((k for k, v in vars(a).items() if isinstance(v, str) and not v.strip()), None)
    if empty:                                                 # not the default in disguise
        raise ValueError(f"--{empty.replace('_', '-')} is empty")
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, PROFILED if (a.suite, k) == ("profile", "policies") else v)
    if a.gather_per_sm is not None:            # the device gather kernel's grid, for this run
        if not triton_available():
            raise ValueError("--gather-per-sm sets the device gather's grid, which needs triton")
        device_kernel("gather_rows")                          # imports kernel.py as the engine does
        sys.modules["kernel"].PER_SM = a.gather_per_sm
    if a.slots is not None:                    # how InfiniGen's top-k selections run, for this run
        if a.slots != "torch" and not triton_available():
            raise ValueError(f"--slots {a.slots} needs triton")
        SK.SLOTS = a.slots


def per_sm(s):
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 64:                                                   # NaN too
        raise cli.argparse.ArgumentTypeError(f"expected a number from 0 to 64, got {s[:40]!r}")
    return int(v) if v.is_integer() else v


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["cpu", "gpu", "timeline", "gather", "report", "profile"],
                   default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text", help="cpu: the prompt's source text (default: GPL-3 in "
                   "/usr/share/common-licenses)")
    p.add_argument("--prompt-tokens", type=cli.positive_int,
                   help="cpu: prompt length in tokens (default 512)")
    p.add_argument("--new-tokens", type=cli.positive_int,
                   help="cpu, gpu: at least 2; default 128 (cpu), 16 (gpu)")
    p.add_argument("--models", help=f"gpu (default smollm2,7b), timeline and profile (one; default smollm2): "
                                    f"from {', '.join(SHAPES)}")
    p.add_argument("--shapes", help="gpu, timeline (one), gather (one), profile (one): BATCHxCONTEXT,... "
                   f"(context = prompt + new tokens; the timeline decodes {TRACED}); default per model: "
                   f"{ROWS}")
    p.add_argument("--policies",
                   help=f"gpu: POLICY[:BUDGET],... and hf-dynamic, hf-offloaded (default {POLICIES}); "
                        f"profile: the engine's (default {PROFILED})")
    p.add_argument("--gather", choices=I.GATHERS,
                   help="gpu, timeline, profile: how sparse rows are gathered (default auto); gather: the "
                        "gather measured (auto: both on CUDA, host on a CPU)")
    p.add_argument("--no-graphs", dest="graphs", action="store_const", const=False,
                   help="gpu: decode steps op by op, their copy waits timed (default: CUDA graphs where "
                        "they can be)")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="gpu, timeline, gather: default cuda when present")
    p.add_argument("--gather-per-sm", type=per_sm,
                   help=f"gpu, timeline: the device gather kernel's programs per SM, a fraction too (default "
                        f"{DEFAULT_PER_SM}; 0: a program per block of 32 rows, as in the 2026-12-04 run)")
    p.add_argument("--slots", choices=["torch", "kernel", "fused"],
                   help="gpu: how InfiniGen's top-k selection runs (default torch: a top-k, a sort and small "
                        "operations; kernel: one Triton kernel, kernel.top_slots; fused: InfiniGen's partial "
                        "scores too, kernel.partial_scores)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="profile: the model's dtype (default float16 on CUDA, float32 on a CPU)")
    p.add_argument("--out", help="the results file (default results/bench-cpu.json, bench-<gpu>.json "
                   "(bench-gpu-suite-cpu.json on a CPU), timeline-<device>.json and .png, "
                   "gather-<device>.json)")
    p.add_argument("--results", help="report: the gpu suite's results file (results/bench-<gpu>.json)")
    a = p.parse_args(argv)
    try:
        if a.text:                                       # before the first measurement, not after
            cli.read_text(a.text, "--text")
        check_flags(a)
        suites = {"cpu": suite_cpu, "gpu": suite_gpu, "timeline": suite_timeline, "gather": suite_gather,
                  "report": suite_report, "profile": suite_profile}
        suites[a.suite](a)
    except (*cli.KNOWN, RowsFailed) as e:                  # OSError: files
        cli.fail(e)
    except KeyboardInterrupt:
        cli.interrupted(": the results files written so far are whole")


if __name__ == "__main__":
    cli.run_script(main)
