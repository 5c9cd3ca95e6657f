"""Decode throughput of the engine's policies against Hugging Face transformers.

  python bench.py --suite cpu   the default model, batch 1, a 512-token prompt, 128 new tokens, float32,
                                on this CPU: full / offload / infinigen vs transformers `generate`;
                                also the peak resident memory of `python infinigen.py --max-new-tokens 64`.
  python bench.py --suite gpu   policies x batch x context on the default model and a random-weight
                                Llama-2-7B-shaped model (float16), with transformers' DynamicCache
                                (on the GPU, and offloading=True) as the outside reference.
Prints tables, writes results/bench-*.json. Timings are reported, never asserted.
How decode time is measured: ours from `generate`'s stats (prefill synced and excluded, then the
N-1 decode forwards of N new tokens). Transformers: a LogitsProcessor stamps the time (after a sync
on CUDA) each time it is called, i.e. once after every forward; decode time = last stamp - first
stamp, which spans the same N-1 decode forwards, and prefill time = first stamp - start.
"""
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import infinigen as I
import model as M
import prepare
from offload import OffloadError

ROOT = os.path.dirname(os.path.abspath(__file__))
LICENSES = "/usr/share/common-licenses"


def say(*a):
    print(*a, file=sys.stderr, flush=True)


# --- Common helpers
def env_info():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "") \
        if os.path.exists("/proc/cpuinfo") else ""
    import transformers
    return {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "processor": platform.processor(),
            "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def write(name, data):
    data["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    path = os.path.join(ROOT, "results", name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    say(f"wrote {path}")


def table(rows, cols):
    """Print rows (dicts) as aligned columns; None shows as '-'."""
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, width)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, width)))


def ours(model, prompts, policy, new):  # our generate, never stopping early (no stop ids) -> (tokens, stats)
    return I.generate(model, prompts, I.Policy(policy), new, stop_ids=())


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
                          min_new_tokens=new, past_key_values=cache, logits_processor=LogitsProcessorList([Stamp()]),
                          pad_token_id=0)
    steps, decode_s = len(t) - 1, t[-1] - t[0]
    return out[:, ids.shape[1]:].tolist(), {
        "prefill_s": round(t[0] - t0, 4), "decode_s": round(decode_s, 4), "decode_steps": steps,
        "tokens_per_s": round(ids.shape[0] * steps / decode_s, 2) if decode_s > 0 else None}


def load_hf_default(device, dtype):
    from transformers import AutoModelForCausalLM
    g = prepare.gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g), dtype=dtype)
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
    name = "GPL-3" if "GPL-3" in names else next((n for n in names if os.path.isfile(os.path.join(LICENSES, n))), None)
    if name is None:
        sys.exit(f"error: no text file in {LICENSES}; give one with --text")
    return os.path.join(LICENSES, name)


def suite_cpu(a):
    info = env_info()
    new, n_prompt = a.new_tokens or 128, a.prompt_tokens
    text = a.text or default_text()
    dev, dtype = torch.device("cpu"), torch.float32

    say("peak resident memory of the demo command (a child process) ...")
    rss = {}
    for extra in ([], ["--policy", "infinigen"]):
        cmd = ["--max-new-tokens", "64"] + extra
        mib, rc = peak_rss(cmd)
        rss[" ".join(["python infinigen.py"] + cmd)] = {"peak_rss_mib": mib, "exit": rc}
        say(f"  python infinigen.py {' '.join(cmd)}: {mib} MiB (exit {rc})")

    say("loading our model and the transformers model (GGUF, float32) ...")
    model, folder = M.load(prepare.prepare(), dev, dtype)
    ids = I.Tok(folder).encode(open(text, encoding="utf-8", errors="replace").read(), chat=False)
    if len(ids) < n_prompt:
        sys.exit(f"error: {text} has only {len(ids)} tokens, {n_prompt} needed")
    ids = ids[:n_prompt]
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
    write("bench-cpu.json", {**info, "suite": "cpu", "model": folder, "text": text, "batch": 1,
                             "prompt_tokens": n_prompt, "new_tokens": new, "dtype": "float32",
                             "results": res, "peak_rss": rss})


# --- GPU suite
def pinned_h2d_bandwidth(dev, n=5):
    """Bytes/s of host->device copies from a 1 GiB pinned tensor."""
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
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    host_empty = getattr(torch._C, "_host_emptyCache", None)     # pinned blocks go back too (CUDA builds)
    if host_empty is not None:
        host_empty()


def llama7b_dir(max_len):
    """A Llama-2-7B-shaped checkpoint with random float16 weights, written once to a temp folder."""
    path = os.path.join(tempfile.gettempdir(), f"infinigen-bench-llama7b-random-{max_len}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import LlamaConfig, LlamaForCausalLM
    say(f"building a random Llama-2-7B-shaped model in {path} (once) ...")
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=max_len)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg)
        m.save_pretrained(path + ".tmp")
    finally:
        torch.set_default_dtype(torch.float32)
    os.replace(path + ".tmp", path)
    del m
    free_memory()
    return path


def shape_rows(run, name, impl, batches, contexts, new, vocab, bw):
    """Run `run(prompts_tensor, new)` -> stats for every batch x context; a row each, skips included."""
    rows = []
    for B in batches:
        for ctx in contexts:
            row = {"model": name, "impl": impl, "batch": B, "context": ctx}
            ids = torch.randint(0, vocab, (B, ctx - new), generator=torch.Generator().manual_seed(B * ctx))
            say(f"  {name} {impl} batch {B} context {ctx} ...")
            try:
                s = run(ids, new)
            except (torch.OutOfMemoryError, OffloadError, M.ModelError, RuntimeError, ValueError) as e:
                s = {"skipped": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"}  # does not fit
            free_memory()                      # here, once the exception (and the frames it holds) is gone
            rows.append(row)
            if "skipped" in s:
                row.update(s)
                say(f"    skipped: {s['skipped']}")
                continue
            h2d = s.get("h2d_bytes_per_step")
            step = s["decode_s"] / s["decode_steps"] if s["decode_steps"] else None
            floor = h2d / bw if h2d else None
            row.update(s, step_s=round(step, 5) if step else None, pcie_floor_s=round(floor, 5) if floor else None,
                       step_over_floor=round(step / floor, 2) if step and floor else None)
    return rows


def suite_gpu(a):
    if not torch.cuda.is_available():
        print("the GPU suite needs CUDA, and CUDA is not available here (try --suite cpu)")
        return
    dev = torch.device("cuda")
    info = env_info() | {"gpu": torch.cuda.get_device_name(dev)}
    new = a.new_tokens or 16
    batches, contexts = [int(x) for x in a.batches.split(",")], [int(x) for x in a.contexts.split(",")]
    say("measuring pinned host->device bandwidth (1 GiB) ...")
    bw = pinned_h2d_bandwidth(dev)
    say(f"  {bw / 1e9:.1f} GB/s")
    rows = []
    for name in a.models.split(","):
        if name not in ("default", "7b"):
            sys.exit(f"error: unknown model {name!r} (choose from default, 7b)")
        folder = prepare.prepare() if name == "default" else llama7b_dir(max(4096, max(contexts)))
        model, _ = M.load(folder, dev, torch.float16)
        vocab = model.cfg.vocab_size
        say(f"{name}: warming up ...")
        for pol in a.policies.split(","):
            ours(model, [list(range(64))], pol, 4)
        for pol in a.policies.split(","):
            rows += shape_rows(lambda ids, n: ours(model, ids.tolist(), pol, n)[1], name, pol,
                               batches, contexts, new, vocab, bw)
        del model
        free_memory()

        from transformers import AutoModelForCausalLM, DynamicCache
        hf = load_hf_default(dev, torch.float16) if name == "default" else \
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cuda").eval()
        hf_generate(hf, torch.arange(64, device=dev)[None], 4)
        c = hf.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_token = 2 * c.num_hidden_layers * (c.num_key_value_heads or c.num_attention_heads) * head_dim * 2  # K+V, fp16
        for offloading in (False, True):
            def run(ids, n):
                cache = DynamicCache(config=hf.config, offloading=offloading)
                s = hf_generate(hf, ids.to(dev), n, cache)[1]
                if offloading:   # estimated: every layer's whole past comes back each step (mean past length)
                    s["h2d_bytes_per_step"] = kv_token * ids.shape[0] * (ids.shape[1] + n // 2)
                    s["h2d_estimated"] = True
                return s
            rows += shape_rows(run, name, "hf-offloaded" if offloading else "hf-dynamic", batches, contexts, new,
                               vocab, bw)
        del hf
        free_memory()

    print(f"\nGPU decode, {info['gpu']}, float16, {new} new tokens, pinned H2D {bw / 1e9:.1f} GB/s")
    table(rows, ["model", "impl", "batch", "context", "tokens_per_s", "h2d_bytes_per_step", "pcie_floor_s",
                 "step_s", "step_over_floor", "copy_wait_s", "skipped"])
    slug = "".join(c if c.isalnum() else "-" for c in info["gpu"].lower()).strip("-")
    write(f"bench-{slug}.json", {**info, "suite": "gpu", "dtype": "float16", "new_tokens": new,
                                 "pinned_h2d_bytes_per_s": round(bw), "rows": rows})


# --- Timeline
def suite_timeline(a):
    """One traced decode step of `offload` and `infinigen`: when each layer computed (compute stream)
    and when each layer's K, V copy ran (copy stream, or the host on a CPU). Plot and JSON."""
    from offload import mark
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    name = a.models.split(",")[0]
    folder = llama7b_dir(4096) if name == "7b" and cuda else prepare.prepare()
    model, _ = M.load(folder, dev, dtype)
    B, ctx = int(a.batches.split(",")[0]), int(a.contexts.split(",")[0])
    ids = torch.randint(0, model.cfg.vocab_size, (B, ctx), generator=torch.Generator().manual_seed(0)).to(dev)
    out = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "model": name, "batch": B, "context": ctx,
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["python"] + sys.argv), "runs": {},
           "note": "CUDA: copy-stream and compute-stream events, so overlap is real concurrency" if cuda else
           "CPU: host clock; a copy inside the previous layer's span ran serially within it, not concurrently"}
    for pol in ("offload", "infinigen"):
        say(f"timeline: {pol}, batch {B}, context {ctx} ...")
        cache = I.make_cache(model, I.Policy(pol), B, ctx + 4)
        I.prefill(model, cache, ids, torch.ones_like(ids, dtype=torch.bool))
        tok = ids[:, -1]
        for _ in range(2):                                           # warm up
            I.decode_one(model, cache, tok)
        marks = []
        hooks = [b.register_forward_pre_hook(lambda m, x, i=i: marks.append(("start", i, mark(cuda))))
                 for i, b in enumerate(model.layers)]
        hooks += [b.register_forward_hook(lambda m, x, y, i=i: marks.append(("end", i, mark(cuda))))
                  for i, b in enumerate(model.layers)]
        cache.store.trace = []
        t0 = mark(cuda)
        I.decode_one(model, cache, tok)
        for h in hooks:
            h.remove()
        if cuda:
            torch.cuda.synchronize(dev)
        ms = (lambda e: t0.elapsed_time(e)) if cuda else (lambda t: (t - t0) * 1e3)
        starts = {i: ms(e) for k, i, e in marks if k == "start"}
        layers = [(i, starts[i], ms(e)) for k, i, e in marks if k == "end"]
        copies = [(i, ms(s), ms(e)) for _, i, s, e in cache.store.trace]
        overlap = sum(max(0.0, min(ce, le) - max(cs, ls)) for ci, cs, ce in copies
                      for li, ls, le in layers if li == ci - 1)      # copy of i+1 during layer i
        out["runs"][pol] = {"layers_ms": layers, "copies_ms": copies, "copy_ms": sum(e - s for _, s, e in copies),
                            "copy_during_previous_layer_ms": overlap}
        say(f"  copies {out['runs'][pol]['copy_ms']:.2f} ms in all, {overlap:.2f} ms of it during the previous layer")
    slug = "".join(c if c.isalnum() else "-" for c in out["device"].lower()).strip("-")
    write(f"timeline-{slug}.json", out)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(11, 3.8))
    for ax, (pol, run) in zip(axes, out["runs"].items()):
        for row, spans in ((1, run["layers_ms"]), (0, run["copies_ms"])):
            ax.broken_barh([(s, e - s) for _, s, e in spans], (row - 0.4, 0.8),
                           facecolors=[plt.cm.tab20(i % 20) for i, _, _ in spans])
        ax.set(yticks=[0, 1], yticklabels=["copy", "compute"], title=f"{pol}: one decode step on {out['device']}")
    axes[-1].set_xlabel("ms (colour = layer; a copy lands before its layer computes)")
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "results", f"timeline-{slug}.png"), dpi=90)
    say(f"wrote results/timeline-{slug}.png")


# --- Command line
def main():
    p = I.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["cpu", "gpu", "timeline"], default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text", help="cpu: the prompt's source text (default: GPL-3 in /usr/share/common-licenses)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="cpu: prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=None, help="default: 128 (cpu), 16 (gpu)")
    p.add_argument("--models", default="default,7b", help="gpu: default,7b")
    p.add_argument("--policies", default="full,offload,h2o,infinigen", help="gpu")
    p.add_argument("--batches", default="1,8,16,32", help="gpu")
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="gpu: prompt + new tokens")
    a = p.parse_args()
    {"cpu": suite_cpu, "gpu": suite_gpu, "timeline": suite_timeline}[a.suite](a)


if __name__ == "__main__":
    main()
