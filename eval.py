"""Accuracy of a KV policy against full attention, teacher-forced, on the default model.

  python eval.py --text FILE [--context N] [--policy P] [--budget B] [--alpha A]
                 [--partial-ratio R] [--skew S] [--windows W] [--json]
  python eval.py --passkey [--contexts 1024,2048] [--policy P] ...
  python eval.py --study --text FILE     (the whole study of `make eval`)
  --paper sets the authors' choices (see `python infinigen.py --help`); a flag given next to it wins.
  --device cuda runs any of them on a GPU (float32; CPU by default).

Each window of N tokens is prefilled densely but for its last --decode D tokens, which are left to the
policy: it decodes D - 1 of them one by one, always fed the true token, and each decoded position's
next-token distribution (D - 1 of them; the window's last token is only a target) is compared with full
attention's: perplexity, top-1 agreement, KL(full || policy).
"""
import json
import math
import os
import random
import signal
import sys
import time

if __name__ == "__main__":  # a Ctrl-C while torch imports: no traceback, status 130
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
import torch

import cli
import infinigen as I
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {k: getattr(I.Policy(), k) for k in I.PAPER}      # the engine's defaults of what --paper sets


# --- Teacher-forced comparison
@torch.no_grad()
def full_logprobs(model, windows, start):
    """Full attention's log-probabilities for positions start.. of each window: (B, N-start, V)."""
    B, N = windows.shape
    cache = M.DenseCache(model.cfg, B, N, windows.device, next(model.parameters()).dtype)
    out = []
    for s in range(0, N, 512):
        lg = model(windows[:, s:s + 512], cache)
        out.append(lg[:, max(start - s, 0):].float().log_softmax(-1))
    return torch.cat(out, 1)[:, :N - start]


@torch.no_grad()
def compare(model, windows, pol, prefix=None, chunk=256, progress=True):
    """Decode each window (W, N) teacher-forced with `pol` after a dense prefix; compare with full.
    Windows run one at a time: on a CPU, batch 1 is the fast shape for the vocabulary projection."""
    W, N = windows.shape
    prefix = prefix or N // 2
    rows, frac, missed, asked, t0, dev = [], [], 0, 0, time.time(), next(model.parameters()).device
    try:                                     # the progress line ends, also on an error or a Ctrl-C
        for w in range(W):
            win = windows[w:w + 1].to(dev)
            ref = full_logprobs(model, win, prefix)[0]                 # position t's logits predict token t+1
            cache = I.make_cache(model, pol, 1, N)
            I.prefill(model, cache, win[:, :prefix], torch.ones(1, prefix, dtype=torch.bool))
            pool = cache.store.pool if hasattr(cache, "store") else None
            if pool:                                                     # count the decode steps only
                missed, asked = missed - pool.misses, asked - pool.requests
            for t in range(prefix, N - 1):
                lp = I.decode_one(model, cache, win[:, t])[0].float().log_softmax(-1)   # predicts token t+1
                r, tgt = ref[t - prefix], win[0, t + 1]
                rows.append(torch.stack([-lp[tgt], -r[tgt], (lp.argmax() == r.argmax()).float(),
                                         (r.exp() * (r - lp)).sum().clamp(min=0)]))  # on the device: no sync
                if progress and (t - prefix) % 64 == 0:
                    print(f"\r  {pol.name}: window {w + 1}/{W}, {t - prefix + 1}/{N - 1 - prefix} positions "
                          f"({time.time() - t0:.0f}s)", end="", file=sys.stderr, flush=True)
            frac.append(I.stats_of(model, cache, 0, 1, 1, 1).get("fetched_fraction_per_layer",
                                                                 [1.0] * model.cfg.n_layers))
            if pool:
                missed, asked = missed + pool.misses, asked + pool.requests
    finally:
        if progress:
            print(file=sys.stderr)
    nll, nll_full, agree, kl = torch.stack(rows).cpu().view(W, N - 1 - prefix, 4).unbind(-1)   # each (W, n)
    finite = torch.isfinite(torch.stack([nll, nll_full, kl])).all()
    if not (finite and max(nll.mean(), nll_full.mean()) < 700):
        raise ValueError("the model's log-probabilities are not finite (or its perplexity passes e^700): "
                         "are its weights broken?")
    frac = torch.tensor(frac).mean(0).tolist()                                            # per layer
    dense = pol.dense_layers if pol.name not in ("full", "offload") else model.cfg.n_layers
    chunks = [{"start": prefix + 1 + c, "ppl": math.exp(nll[:, c:c + chunk].mean()),
               "ppl_full": math.exp(nll_full[:, c:c + chunk].mean()), "kl": kl[:, c:c + chunk].mean().item()}
              for c in range(0, nll.shape[1], chunk)]
    return {"ppl": math.exp(nll.mean()), "ppl_full": math.exp(nll_full.mean()), "top1": agree.mean().item(),
            "kl": kl.mean().item(), "fetched_fraction": sum(frac) / len(frac),
            "sparse_fraction": sum(frac[dense:]) / (len(frac) - dense) if dense < len(frac) else 1.0,
            "fetched_per_layer": [round(f, 4) for f in frac], "positions": int(nll.numel()), "chunks": chunks,
            **({"pool_miss_rate": missed / asked} if asked else {})}   # rows asked for but evicted


def windows_of(tok, path, n, count, seed=0):
    """`count` windows of n tokens from the text, evenly spaced (deterministic)."""
    ids = tok.encode(cli.read_text(path, "text file"), chat=False)
    if len(ids) < n:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one window of {n}")
    if count > len(ids) - n + 1:
        raise ValueError(f"--windows {count}: {path} has {len(ids) - n + 1} different windows of {n} tokens")
    starts = [round(i * (len(ids) - n) / max(count - 1, 1)) for i in range(count)]
    return torch.tensor([ids[s:s + n] for s in starts])


# --- Passkey retrieval
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


ANSWER = 8                                                          # tokens generated for the answer


def passkey_prompt(tok, context, depth, key):
    """A key hidden at `depth` (0..1) of `context` tokens of filler, then the question."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    n_fill = max(context - len(tok.encode(needle + question, chat=False)) - 16, 0)      # room for the answer
    fill = tok.encode(FILLER * (context // 10), chat=False)[:n_fill]
    cut = int(len(fill) * depth)
    text = tok.decode(fill[:cut]) + needle + tok.decode(fill[cut:]) + question
    return tok.encode(text, chat=False)


def passkey_trials(tok, contexts, depths=(0.1, 0.5, 0.9), seed=0):
    """context -> [(key, prompt ids)] per depth, all made before any is run: a ValueError for a context
    too short to hold the prompt and the answer (this model's tokenizer decides how long the prompt is)."""
    rng, out = random.Random(seed), {}
    for n in contexts:
        keys = [rng.randint(10000, 99999) for _ in depths]
        out[n] = [(key, passkey_prompt(tok, n, dp, key)) for dp, key in zip(depths, keys)]
        longest = max(len(ids) for _, ids in out[n])
        if longest + ANSWER > n:
            raise ValueError(f"--contexts {n} is too short for the passkey prompt: it takes {longest} tokens "
                             f"of this model's tokenizer, and the answer {ANSWER} more")
    return out


def passkey(model, tok, pol, contexts, trials=None):
    """Accuracy per context; `trials`: passkey_trials(tok, contexts), when already made."""
    out = {}
    for n, tries in (trials or passkey_trials(tok, contexts)).items():
        hits = 0
        for key, prompt in tries:
            ids, _ = I.generate(model, [prompt], pol, max_new=ANSWER)
            hits += str(key) in tok.decode(ids[0])
        out[str(n)] = hits / len(tries)
        print(f"  passkey {pol.name} {n} tokens: {out[str(n)]:.2f}", file=sys.stderr)
    return out


# --- The study (make eval)
PARTS = ("policies", "alpha", "ratio", "pool", "layers", "paper", "passkey")


UNREAD = {  # mode -> the flags it does not read, and why: given, they are refused, not ignored
    "study": ({"policy", "budget", "dense_layers", "cpu_kv_capacity", "eviction"}, "each part sets its own"),
    "passkey": ({"text", "context", "windows", "decode"}, "it makes its own prompts, --contexts long"),
    "text": ({"contexts"}, "only --passkey and --study read it")}


def check_only(args):
    """--only: with --study, parts of it by name (an unknown one is refused, not skipped). And a flag the
    chosen mode does not read (UNREAD; --report reads none) is refused."""
    if args.only is not None:
        if not args.study:
            raise ValueError("--only chooses parts of --study: give --study too")
        if unknown := [p for p in args.only.split(",") if p not in PARTS]:
            raise ValueError(f"--only: unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})")
    if args.study and args.passkey:
        raise ValueError("--passkey and --study both given: the study's own is --study --only passkey")
    mode = "report" if args.report else "study" if args.study else "passkey" if args.passkey else "text"
    given = [k for k in getattr(args, "given", ()) if k not in ("paper", "json")]   # its default too
    given += ["paper"] if args.paper and mode == "report" else []      # elsewhere it sets the defaults
    unread, why = UNREAD.get(mode, (set(given) - {"report"}, "it rebuilds the table from results/"))
    if bad := [k for k in given if k in unread]:
        raise ValueError(f"--{bad[0].replace('_', '-')} is not read by --{mode}: {why}")
    if mode == "study" and "contexts" in given and not wants_passkey(args):
        raise ValueError(f"--contexts is read by the passkey part only, which --only {args.only} leaves out")


def wants_passkey(args):
    return args.passkey or (args.study and (not args.only or "passkey" in args.only.split(",")))


def wants_text(args):  # the windows of --text: a single run, or a study with a part other than passkey
    return not args.passkey and (not args.study or not args.only or args.only.split(",") != ["passkey"])


def study(model, tok, args):
    """Every comparison of `make eval`, one JSON per part in results/: {"results": the files written}.
    (report() then makes the plots and the README table.)"""
    base = dict(budget=0.1, alpha=args.alpha, partial_ratio=args.partial_ratio, skew=args.skew,
                layer_budget=args.layer_budget, head_count=args.head_count)
    other = "uniform" if args.layer_budget == "prompt" else "prompt"       # the layers part: the other rule
    win = windows_of(tok, args.text, args.context, args.windows) if wants_text(args) else None
    parts = {
        "policies": [dict(base, name=n, budget=b)
                     for b in (0.05, 0.1, 0.2) for n in ("infinigen", "h2o", "oracle")]
        + [dict(base, name="streaming"), dict(base, name="infinigen", skew="svd"),
           dict(base, name="infinigen", skew="none")],
        "alpha": [dict(base, name="infinigen", alpha=a) for a in (2.0, 5.0, 8.0, math.inf)],
        "ratio": [dict(base, name="infinigen", partial_ratio=r) for r in (0.125, 0.3, 0.5, 0.75, 1.0)],
        "pool": [dict(base, name="infinigen", capacity=0.8, eviction=e) for e in ("fifo", "lru", "counter")],
        "layers": [dict(base, name=n, budget=b, layer_budget=other)
                   for b in (0.1, 0.2) for n in ("infinigen", "h2o", "oracle")],
        "paper": [dict(kw, name="infinigen", budget=b) for b in (0.1, 0.2) for kw in (I.PAPER, DEFAULTS)],
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    meta = {"model": args.model or "default", "text": args.text and os.path.basename(args.text),
            "context": args.context, "windows": args.windows, "decode": args.decode,
            "command": "python eval.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d")}
    written = []
    for part, pols in parts.items():
        if args.only and part not in args.only.split(","):
            continue
        rows = []
        for kw in pols:
            r = compare(model, win, I.Policy(**kw), prefix=args.context - args.decode)
            rows.append(dict(policy={k: (str(v) if v == math.inf else v) for k, v in kw.items()}, **r))
            print(f"  {part}: {kw} -> kl {r['kl']:.4f} top1 {r['top1']:.3f} "
                  f"sparse {r['sparse_fraction']:.3f}", file=sys.stderr)
            path = save(f"eval-{part}.json", dict(meta, rows=rows))      # after each row: a Ctrl-C keeps it
        written.append(path)
    if wants_passkey(args):
        rows = [dict(policy={k: (str(v) if v == math.inf else v) for k, v in kw.items()},
                     accuracy=passkey(model, tok, I.Policy(**kw), args.contexts, args.trials))
                for kw in (dict(name="full"), dict(base, name="infinigen"), dict(base, name="h2o"))]
        written.append(save("eval-passkey.json", dict(meta, rows=rows)))
    return {"results": written}


def load_part(name):
    path = os.path.join(HERE, "results", f"eval-{name}.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not readable JSON: {str(e)[:80]}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:                # eval.py writes a part after its first row
        raise ValueError(f"{path} is not a results file of eval.py (no list of rows)")
    for i, r in enumerate(rows):
        if bad := row_problem(r, name == "passkey"):
            raise ValueError(f"{path}: row {i + 1} is not what eval.py writes: its {bad}")
    if name == "passkey" and len({frozenset(r["accuracy"]) for r in rows}) > 1:
        raise ValueError(f"{path}: its rows measured different contexts (one table needs the same)")
    return data


def row_problem(r, passkey):
    """The first field of a results row that report() and plots() could not read (a hand-edited or
    foreign file), or None."""
    num = cli.json_number
    p = r.get("policy") if isinstance(r, dict) else None
    if not isinstance(p, dict) or p.get("name") not in I.POLICIES:
        return "policy (a name of " + ", ".join(I.POLICIES) + ")"
    pol = {"budget": num(p.get("budget")) or p["name"] == "full" and passkey,
           "layer_budget": isinstance(p.get("layer_budget", ""), str),
           "eviction": isinstance(p.get("eviction", ""), str), "capacity": num(p.get("capacity", 0))}
    if p["name"] == "infinigen":
        pol |= {"skew": isinstance(p.get("skew"), str), "partial_ratio": num(p.get("partial_ratio")),
                "alpha": num(p.get("alpha")) or p.get("alpha") in ("inf", "Infinity")}
    if passkey:
        acc = r.get("accuracy")
        row = {"accuracy": isinstance(acc, dict) and bool(acc) and all(num(v) for v in acc.values())}
    else:
        row = {k: num(r.get(k)) for k in ("kl", "top1", "ppl", "ppl_full", "fetched_fraction",
                                          "sparse_fraction")}
        row["pool_miss_rate"] = num(r.get("pool_miss_rate", 0))
        chunks = r.get("chunks")
        row["chunks"] = isinstance(chunks, list) and all(
            isinstance(c, dict) and all(num(c.get(k)) for k in ("start", "ppl", "ppl_full")) for c in chunks)
    bad = [f"policy's {k}" for k, ok in pol.items() if not ok] + [k for k, ok in row.items() if not ok]
    return bad[0] if bad else None


def label(p):
    extra = f" {p['skew']}" if p["name"] == "infinigen" else ""
    paper = all(str(p.get(k)) == str(v) for k, v in I.PAPER.items() if k != "budget")
    return f"{p['name']}{extra}" + (" (paper)" if p["name"] == "infinigen" and paper else "")


def window_keys(part):  # what makes two parts' numbers one table's: passkey makes its own prompts
    return ("model",) if part == "passkey" else ("model", "text", "context", "windows", "decode")


def keeps_same_windows(args):
    """--study --only reruns some parts and keeps the others' files for the README's one table: refused before
    any work when a kept part was measured otherwise (report() would refuse the mix after the run)."""
    if not args.text:                                               # refused as missing, later
        return
    meta = {"model": args.model or "default", "text": os.path.basename(args.text),
            "context": args.context, "windows": args.windows, "decode": args.decode}
    new = [p for p in PARTS[:-1] if not args.only or p in args.only.split(",")]
    new += ["passkey"] if wants_passkey(args) else []
    for part, res in ((p, load_part(p)) for p in PARTS if p not in new):
        for k in [k for k in window_keys(part) if res and any(k in window_keys(p) for p in new)]:
            if (v := res.get(k, "default" if k == "model" else None)) != meta[k]:
                raise ValueError(f"--only {args.only} would measure {k} {meta[k]}, but "
                                 f"results/eval-{part}.json, which it keeps, has {v}: one table needs the "
                                 "same; run the whole --study, or move that file away")


def same_windows(parts):
    """One table holds one model's numbers on the same windows: a part measured otherwise (a quick study
    of another model or text) is refused by name, before anything is written."""
    first = {}                                     # setting -> (its value, the part that set it first)
    for part, res in ((p, r) for p, r in parts.items() if r):
        for k in window_keys(part):
            v = res.get(k, "default" if k == "model" else None)
            was, where = first.setdefault(k, (v, part))
            if v != was:
                raise ValueError(f"results/eval-{part}.json was measured with {k} {v}, eval-{where}.json "
                                 f"with {was}: one table needs the same; rerun a part or move its file away")


def report():
    """The README's accuracy table and the plots, from results/eval-*.json. Returns what it wrote:
    {"parts": the results parts read, "readme": README.md or None (no rows), "plots": the images}."""
    parts = {p: load_part(p) for p in PARTS}
    same_windows(parts)
    rows, runs, readme = [], {}, None
    for part, res in parts.items():                     # which run made which parts
        if res:
            runs.setdefault((res.get("command"), res.get("date")), []).append(part)
    for part in list(parts)[:-1]:                       # the table: every part but passkey
        for r in (parts[part] or {}).get("rows", []):
            p = r["policy"]
            knobs = [f"α={p['alpha']}", f"r={p['partial_ratio']}"] if p["name"] == "infinigen" else []
            knobs += ["heads: their mean count"] if p.get("head_count") == "mean" else []
            miss = f" ({r['pool_miss_rate']:.2%} of rows missed)" if "pool_miss_rate" in r else ""
            knobs += [f"pool 80% {p['eviction']}{miss}"] if p.get("capacity") else []
            knobs = ", ".join(knobs + ["layers: " + p.get("layer_budget", "uniform")])
            rows.append(f"| {part} | {label(p)} | {p['budget']} | {knobs} | {r['kl']:.4f} | "
                        f"{r['top1']:.3f} | {r['ppl']:.2f} / {r['ppl_full']:.2f} | "
                        f"{r['fetched_fraction']:.3f} | {r['sparse_fraction']:.3f} |")
    if rows:
        meta = next(parts[p] for p in PARTS[:-1] if parts[p])
        dec, model = meta.get("decode", 512), meta.get("model", "default")
        scored = f" ({dec - 1} positions scored)" if type(dec) is int else ""
        table = ("Default model" if model == "default" else f"Model `{model}`") + (
                 f", `{meta.get('text')}`, {meta.get('windows')} window(s) of "
                 f"{meta.get('context')} tokens, the last {dec} left to the policy{scored}; "
                 "made by " + "; ".join(f"`{c}` on {d}" + (f" ({', '.join(ps)})" if len(runs) > 1 else "")
                                        for (c, d), ps in runs.items()) + ".\n\n"
                 "| part | policy | budget | settings | KL(full‖policy) | top-1 | ppl / full | "
                 "fetched (all layers) | fetched (sparse layers) |\n|---|---|---|---|---|---|---|---|---|\n"
                 + "\n".join(rows))
        pk = parts["passkey"]
        if pk:
            ctx = list(pk["rows"][0]["accuracy"])
            table += ("\n\nPasskey retrieval (accuracy over depths 10%, 50%, 90%):\n\n| policy | "
                      + " | ".join(ctx)
                      + " |\n|---|" + "---|" * len(ctx) + "\n" + "\n".join(
                          "| " + ("full" if r["policy"]["name"] == "full" else
                                  f"{label(r['policy'])} {r['policy'].get('budget', '')}") + " | "
                          + " | ".join(f"{r['accuracy'][c]:.2f}" for c in ctx) + " |" for r in pk["rows"]))
        readme = os.path.join(HERE, "README.md")
        text = open(readme, encoding="utf-8").read()
        a, b = text.find("<!-- eval:begin -->"), text.find("<!-- eval:end -->")
        if not 0 <= a < b:
            raise ValueError(f"{readme} has no <!-- eval:begin --> ... <!-- eval:end --> markers")
        with cli.whole(readme) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text[:a] + "<!-- eval:begin -->\n" + table + "\n" + text[b:])
    return {"parts": [p for p, res in parts.items() if res], "readme": readme, "plots": plots()}


def plots():
    """The figures of results/ (none without the policies part); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pol = load_part("policies")
    if not pol:
        return []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in ("infinigen", "h2o", "oracle"):
        pts = sorted((r["policy"]["budget"], r["kl"]) for r in pol["rows"]
                     if r["policy"]["name"] == name and r["policy"].get("skew") in ("planes", None))
        ax[0].plot(*zip(*pts), "o-", label=name)
    ax[0].set(xlabel="budget per sparse layer", ylabel="KL(full ‖ policy)", yscale="log",
              title="accuracy vs budget")
    ax[0].legend()
    for r in pol["rows"]:
        if r["policy"]["budget"] == 0.1 and r["policy"].get("skew", "planes") == "planes":
            ax[1].plot([c["start"] for c in r["chunks"]], [c["ppl"] for c in r["chunks"]], "o-",
                       label=label(r["policy"]))
    ax[1].plot([c["start"] for c in r["chunks"]], [c["ppl_full"] for c in r["chunks"]], "k--", label="full")
    ax[1].set(xlabel="position", ylabel="perplexity per 256-token chunk", title="budget 0.1")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    with cli.whole(os.path.join(HERE, "results", "eval-policies.png")) as tmp:
        fig.savefig(tmp, dpi=90)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, (part, key) in enumerate((("alpha", "alpha"), ("ratio", "partial_ratio"))):
        res = load_part(part)
        if res:
            pts = sorted((float(r["policy"][key]), r["kl"], r["sparse_fraction"]) for r in res["rows"])
            xs = [x if x != math.inf else 16 for x, _, _ in pts]
            ax[i].plot(xs, [k for _, k, _ in pts], "o-")
            for x, (_, k, f) in zip(xs, pts):
                ax[i].annotate(f"{f:.3f}", (x, k), fontsize=7)
            ax[i].set(xlabel=key + (" (16 = inf)" if key == "alpha" else ""), ylabel="KL",
                      title=f"infinigen, budget 0.1: {key} (labels: fetched)")
    fig.tight_layout()
    with cli.whole(os.path.join(HERE, "results", "eval-sweeps.png")) as tmp:
        fig.savefig(tmp, dpi=90)
    return [os.path.join(HERE, "results", f"eval-{name}.png") for name in ("policies", "sweeps")]


def save(name, obj):  # whole or not at all; returns the path
    path = os.path.join(HERE, "results", name)
    cli.write_json(path, obj)
    return path


# --- Command line
def policy_from(args, **over):
    kw = dict(name=args.policy, budget=cli.budget_of(args.budget), alpha=args.alpha,
              partial_ratio=args.partial_ratio, skew=args.skew, dense_layers=args.dense_layers,
              capacity=args.cpu_kv_capacity, eviction=cli.eviction_of(args), layer_budget=args.layer_budget,
              head_count=args.head_count)
    kw.update(over)
    return I.Policy(**kw)


def contexts_of(spec, limit):
    """--contexts: a comma list of different positive token counts, none past the model's context."""
    items = [c.strip() for c in spec.split(",")]
    bad = next((c for c in items if not (c.isdecimal() and len(c) < 20 and int(c) > 0)), None)
    if bad is not None:
        raise ValueError(f"--contexts wants a comma list of positive token counts, got {bad[:40]!r} "
                         f"in {spec[:80]!r}")
    ctx = [int(c) for c in items]
    if len(set(ctx)) < len(ctx):
        raise ValueError(f"--contexts names a context twice: {spec[:80]!r}")
    if max(ctx) > limit:
        raise ValueError(f"--contexts {max(ctx)} is past the model's context of {limit} tokens")
    return ctx


def run(args):
    """What main asks for, a dict: the results, or for --study and --report the files written."""
    check_only(args)
    if args.report:
        return report()
    if args.study:
        keeps_same_windows(args)
    pol = policy_from(args)
    dev = cli.device_of(args.device)
    model, tok = M.load_with_tokenizer(args.model, dev, torch.float32)
    if not args.study:
        cli.check_dense(pol, model.cfg)
    if wants_passkey(args):
        args.contexts = contexts_of(args.contexts, model.cfg.max_seq_len)
        args.trials = passkey_trials(tok, args.contexts)     # a context too short fails now, before any work
    if wants_text(args):
        if not args.text:
            raise ValueError("--text FILE is required (or --passkey)")
        if not 2 <= args.decode < args.context <= model.cfg.max_seq_len:
            raise ValueError(f"--decode {args.decode} must be at least 2 and smaller than --context "
                             f"{args.context}, and --context at most the model's {model.cfg.max_seq_len}")
    if args.study:
        return study(model, tok, args) | report()
    if args.passkey:
        return {"passkey": passkey(model, tok, pol, args.contexts, args.trials)}
    win = windows_of(tok, args.text, args.context, args.windows)
    return compare(model, win, pol, args.context - args.decode)


def build_parser():
    d = I.Policy()
    p = cli.Parser(description=__doc__.split("\n")[0], prints=True)
    a = p.add_argument
    a("--text", help="text file for teacher-forced evaluation")
    a("--context", type=cli.positive_int, default=2048, help="window length in tokens")
    a("--windows", type=cli.positive_int, default=1, help="windows evaluated")
    a("--decode", type=cli.positive_int, default=512,
      help="the tokens left to the policy at each window's end: D - 1 positions decoded and scored")
    a("--policy", choices=I.POLICIES, default="infinigen")
    a("--budget", type=float, default=d.budget)
    a("--alpha", type=float, default=d.alpha)
    a("--head-count", choices=["own", "mean"], default=d.head_count)
    a("--partial-ratio", type=float, default=d.partial_ratio)
    a("--skew", choices=I.SK.MODES, default=d.skew)
    a("--dense-layers", type=int, default=d.dense_layers)
    a("--cpu-kv-capacity", type=float, default=0)
    a("--eviction", choices=["fifo", "lru", "counter"], default=None, help=f"default: {d.eviction}")
    a("--layer-budget", choices=["uniform", "prompt"], default=d.layer_budget)
    a("--passkey", action="store_true", help="run passkey retrieval instead")
    a("--contexts", default="1024,2048,4096,8192", help="passkey contexts")
    a("--model", default=None)
    a("--study", action="store_true", help="run the whole study of `make eval` into results/")
    a("--report", action="store_true",
      help="only rebuild the README table and plots from results/eval-*.json")
    a("--only", help=f"with --study: comma list of parts ({','.join(PARTS)})")
    cli.add_paper(p, "each window's first prefill chunk")
    a("--json", action="store_true",
      help="print one JSON object on stdout: the measures (--text), the accuracy per context (--passkey), "
           "or what was written (--report: parts, the results read; readme, the README rewritten or null; "
           "plots, the images; --study: those and results, the results files it wrote)")
    a("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (float32 on both)")
    return p


def parse(argv=None):
    """The flags, and in args.given those given on the command line, in order (check_only refuses the
    unread ones even at their default value)."""
    p = build_parser()
    args = cli.parse_args(p, argv)
    args.given = [*p.given, *(a.dest for a in p._actions if a.const is True and getattr(args, a.dest))]
    return args


def main(argv=None):
    args = parse(argv)
    try:
        res = run(args)
    except cli.KNOWN as e:
        cli.fail(e)
    except KeyboardInterrupt:
        cli.interrupted(": results files already written stay whole" if args.study or args.report else "")
    try:
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            for k, v in res.items():
                if k != "chunks":
                    print(f"{k:>18}: {v:.4f}" if isinstance(v, float) else f"{k:>18}: {v}", flush=True)
    except OSError as e:                                   # a closed pipe, a full disk
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # nothing left to flush at exit
        cli.fail(e)


if __name__ == "__main__":
    cli.run_script(main)
