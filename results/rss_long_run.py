"""Resident memory over a long run of the engine: the default model, `--policy infinigen`, a batch of
4 prompts of P tokens plus N new tokens (P + N = 8192, the model's context), float32 on the CPU.

Samples, every --every decode steps (and right after prefill), the process's resident memory (VmRSS
of /proc/self/status), the Python objects alive (gc) and the sizes of the engine's per-step
structures (the cache's `handles` and `idx`, the store's `wait_events` and `trace`, the ledger's
lists); writes results/rss-<name>.json and .png. The run itself is `generate`, as the command line
calls it (the cache is caught on its way out of make_cache). Made by:

  nice -n 10 python results/rss_long_run.py --prompt-tokens 4096 --new-tokens 4096 --every 64 --touch
"""
import gc
import json
import os
import resource
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cli  # noqa: E402
import infinigen as I  # noqa: E402
import model as M  # noqa: E402
import prepare  # noqa: E402


def status_mib(key):  # VmRSS: resident; VmSize: virtual (every allocation, touched or not)
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    return round(kib / 1024, 1)


def rss_mib():
    return status_mib("VmRSS")


def buffers(c):
    """The cache's buffers allocated once for the whole context: the CPU store, the resident layers, the
    partial keys, the device buffers and the staging rows. Returns (tensors, bytes each new token writes
    into the store: torch.empty leaves its pages unmapped until written, the others are zero-filled)."""
    st = c.store
    ts = [st.kv, c.rk, c.rv, *st.buf, *getattr(st, "stage", []), *getattr(st, "stage_pos", []),
          *getattr(st, "land", []), *getattr(st, "land_pos", [])] + [k for k in c.kpart if k is not None]
    return ts, st.kv[:, 0].nbytes


def text_tokens(tok, n):
    """At least n tokens of real text: the licenses in /usr/share/common-licenses, else the demo prompt."""
    root = "/usr/share/common-licenses"
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    paths = [os.path.join(root, x) for x in names if os.path.isfile(os.path.join(root, x))]
    paths = paths or [os.path.join(os.path.dirname(HERE), "prompts", "demo.txt")]
    ids = []
    while len(ids) < n:
        for p in paths:
            ids += tok.encode(cli.read_text(p), chat=False)
    return ids


def main():
    p = cli.Parser(description=__doc__.splitlines()[0])
    for flag, default in (("--prompt-tokens", 4096), ("--new-tokens", 4096), ("--batch", 4), ("--every", 64),
                          ("--threads", 1)):
        p.add_argument(flag, type=cli.positive_int, default=default)
    p.add_argument("--name", default="8k")
    p.add_argument("--touch", action="store_true", help="write every preallocated buffer once before the run "
                   "(their pages resident from the start: RSS then shows what the run itself adds)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    a = p.parse_args()
    try:
        run(a)
    except cli.KNOWN as e:                  # no model, a prompt over the context, no results to redraw
        cli.fail(e)


def run(a):
    if a.plot_only:
        path = os.path.join(HERE, f"rss-{a.name}.json")
        with open(path) as f:
            return plot(json.load(f), path[:-5] + ".png")
    torch.set_num_threads(a.threads)
    model, tok = M.load_with_tokenizer(prepare.prepare())
    ids = text_tokens(tok, a.prompt_tokens + 1000 * a.batch)
    prompts = [ids[1000 * b:1000 * b + a.prompt_tokens] for b in range(a.batch)]
    caught, samples, t0 = {}, [], time.perf_counter()
    make_cache = I.make_cache

    def catch(*args, **kw):
        caught["cache"] = c = make_cache(*args, **kw)
        ts, caught["per_token"] = buffers(c)
        if a.touch:
            for t in ts:
                t.zero_()                               # rk, rv, kpart, buf are zeros already; kv is not read
        return c
    I.make_cache = catch          # (this process only: the script's own copy of the module)

    def sample(step):
        c = caught["cache"]
        gc.collect()
        samples.append({"step": step, "t_s": round(time.perf_counter() - t0, 1), "rss_mib": rss_mib(),
                        "vm_mib": status_mib("VmSize"), "gc_objects": len(gc.get_objects()),
                        "handles": len(c.handles), "idx": len(c.idx),
                        "wait_events": len(c.store.wait_events), "trace": len(c.store.trace or ()),
                        "ledger_h2d": len(c.store.ledger.h2d), "decode_steps": c.decode_steps})
        s = samples[-1]
        print(f"step {step}: {s['rss_mib']} MiB, {s['gc_objects']} objects, {s['t_s']} s", file=sys.stderr)

    rss_start, path = rss_mib(), os.path.join(HERE, f"rss-{a.name}.json")

    def save(st=None, stopped=None):  # after every sample: a run stopped early keeps its curve
        rss = [s["rss_mib"] for s in samples]
        out = {"command": "nice -n 10 python results/rss_long_run.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "model": "SmolLM2-135M-Instruct (default)",
               "policy": "infinigen (defaults: budget 0.2, planes, layer budget prompt)", "batch": a.batch,
               "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "torch_threads": a.threads,
               "stopped_after_step": stopped, "rss_before_mib": rss_start, "rss_after_prefill_mib": rss[0],
               "rss_end_mib": rss[-1], "rss_max_sampled_mib": max(rss),
               "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "growth_after_prefill_mib": round(rss[-1] - rss[0], 1), "touched_before_the_run": a.touch,
               "store_bytes_written_per_token": caught["per_token"],
               "expected_growth_if_untouched_mib": round(caught["per_token"] * samples[-1]["step"] / 2**20,
                                                         1),
               "stats": st and {k: st[k] for k in ("prefill_s", "decode_s", "decode_steps", "tokens_per_s",
                                                   "kv_bytes", "h2d_bytes_per_step")},
               "samples": samples}
        cli.write_json(path, out)
        return out

    def on_token(nxt):  # called after prefill, then after every decode step
        on_token.n += 1
        if on_token.n == 1 or on_token.n % a.every == 0 or on_token.n == a.new_tokens:
            sample(on_token.n - 1)                         # decode steps done so far (0: right after prefill)
            save()
    on_token.n, st, stopped = 0, None, None
    try:
        _, st = I.generate(model, prompts, I.Policy("infinigen"), a.new_tokens, stop_ids=(),
                           on_token=on_token, progress=True)
    except KeyboardInterrupt:                              # stopped early: the curve so far
        stopped = samples[-1]["step"] if samples else None
    if not samples:
        return
    out = save(st, stopped)
    plot(out, os.path.join(HERE, f"rss-{a.name}.png"))
    print(f"wrote {path}: RSS {out['rss_after_prefill_mib']} MiB after prefill, {out['rss_end_mib']} at the "
          f"end, max {out['rss_max_sampled_mib']}", file=sys.stderr)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = out["samples"]
    steps = [x["step"] for x in s]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(steps, [x["rss_mib"] for x in s], ".-", label="resident memory")
    ax.plot(steps, [x["vm_mib"] - s[0]["vm_mib"] + s[0]["rss_mib"] for x in s], "k--", lw=0.8,
            label="virtual memory (shifted to start with it)")
    ax2 = ax.twinx()
    ax2.plot(steps, [x["gc_objects"] - s[0]["gc_objects"] for x in s], "g:",
             label="Python objects added since prefill (right)")
    ax2.set_ylabel("objects", color="g")
    ax2.set_ylim(0, max(5000, 1.2 * (s[-1]["gc_objects"] - s[0]["gc_objects"])))
    lo = min(x["rss_mib"] for x in s)
    ax.set_ylim(lo - 100, lo + max(400, 1.2 * (max(x["rss_mib"] for x in s) - lo)))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set(xlabel="decode step (0 = right after prefill)", ylabel="MiB",
           title=f"infinigen, batch {out['batch']}, {out['prompt_tokens']} + {s[-1]['step'] + 1} tokens, CPU"
                 + (", buffers touched first" if out["touched_before_the_run"] else ""))
    fig.tight_layout()
    with cli.whole(path) as tmp:
        fig.savefig(tmp, dpi=80)


if __name__ == "__main__":
    cli.run_script(main)
