"""Make every picture of the tutorial (tutorial/figures/*.png) from real runs on the default model.

  python tutorial/figures.py          (or: make figures)        progress on stderr; one thread
  python tutorial/figures.py 6 7      only the pictures of chapters 6 and 7

Each picture's caption in its chapter says what it shows; the numbers behind them are recomputed
here every time, on the CPU, in float32.
"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import infinigen as I  # noqa: E402
import model as M  # noqa: E402
import skew as SK  # noqa: E402
from tutorial import lab  # noqa: E402

OUT = os.path.join(HERE, "figures")
PROMPT, STEPS = 1024, 32          # tokens of text, then greedy decode steps recorded


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def save(fig, name):
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    say(f"  wrote tutorial/figures/{name} ({os.path.getsize(path) // 1024} KB)")


# --- Chapter 4: sparsity and its movement
def fig_sparsity(rec, L):
    say("chapter 4: tokens holding 90% of the attention, and how the set moves ...")
    frac = []                                                  # per layer: (steps*H,) fractions of the past
    for i in range(L):
        frac.append(torch.cat([lab.tokens_for_mass(s).float() / s.shape[-1] for s in rec.p[i]]))
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.boxplot([f.numpy() for f in frac], positions=range(L), widths=0.6, showfliers=False)
    ax.set(yscale="log", xlabel="layer", ylabel="share of past tokens",
           title=f"fewest tokens holding 90% of a head's attention "
                 f"({PROMPT}-token prompt, {STEPS} decode steps)")
    ax.axhline(0.1, color="grey", ls=":", lw=1)
    ax.set_xticks(list(range(0, L, 2)), [str(i) for i in range(0, L, 2)])
    fig.tight_layout()
    save(fig, "04-sparsity.png")

    lags = list(range(1, STEPS // 2 + 1))
    kept = torch.zeros(L, len(lags))
    for i in range(L):
        for j, lag in enumerate(lags):
            kept[i, j] = torch.stack([lab.kept_mass(rec.p[i][s + lag], lab.top_set(rec.p[i][s])).mean()
                                      for s in range(STEPS - lag)]).mean()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    im = ax.imshow(kept.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=0.9, origin="lower",
                   extent=(lags[0] - 0.5, lags[-1] + 0.5, -0.5, L - 0.5))
    fig.colorbar(im, label="attention mass still on the old set")
    ax.set(xlabel="steps after the set was chosen", ylabel="layer",
           title="the 90% set of one step, read k steps later")
    fig.tight_layout()
    save(fig, "04-drift.png")


# --- Chapter 5: consecutive layers
def fig_layers(model, rec, L):
    say("chapter 5: similarity of consecutive attention inputs; speculating from the layer before ...")
    cos = lab.cosine_next(rec)
    own = [lab.speculated_recall(model, rec, i, 0.1, source=i) for i in range(1, L)]
    ahead = [lab.speculated_recall(model, rec, i, 0.1) for i in range(1, L)]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
    ax[0].bar(range(L - 1), cos.numpy(), color="tab:blue")
    ax[0].set(xlabel="layer i", ylabel="mean cosine", ylim=(0, 1),
              title="cos(attention input of layer i, of layer i+1)")
    ax[1].plot(range(1, L), own, "o-", ms=3, label="its own query (best top-10%)")
    ax[1].plot(range(1, L), ahead, "s-", ms=3, label="query from the layer before (all d columns)")
    ax[1].set(xlabel="layer", ylabel="attention mass kept", ylim=(0, 1),
              title="top 10% of past tokens chosen by ...")
    ax[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save(fig, "05-layers.png")


# --- Chapter 6: skewing
def fig_skew(model, rec, L):
    say("chapter 6: energy per column, with and without skew, before and after RoPE ...")
    cfg = model.cfg

    def cum(e):  # e (Hkv, d) energy per column -> (d,) cumulative share, largest first, mean over heads
        e = e.sort(-1, descending=True).values
        return (e.cumsum(-1) / e.sum(-1, keepdim=True)).mean(0)

    curves = {k: [] for k in ("pre svd", "post none", "post svd", "post planes", "pre A after RoPE")}
    for i in range(cfg.n_layers):
        x = rec.inputs(i)[:PROMPT]
        with torch.no_grad():
            pre = model.layers[i].attn.wq(x).view(-1, cfg.n_heads, cfg.head_dim)      # before RoPE
        post = rec.queries(i)[:PROMPT]                                                 # after RoPE
        gpre, gpost = SK.group_queries(pre, cfg.n_kv_heads), SK.group_queries(post, cfg.n_kv_heads)
        Apre, Apost = SK.svd_skew(gpre), SK.svd_skew(gpost)
        e = lambda g, A=None: (g if A is None else g @ A).pow(2).mean(1)              # (Hkv, d)
        plane = e(gpost)[:, :cfg.head_dim // 2] + e(gpost)[:, cfg.head_dim // 2:]     # (Hkv, d/2)
        curves["pre svd"].append(cum(e(gpre, Apre)))
        curves["post none"].append(cum(e(gpost)))
        curves["post svd"].append(cum(e(gpost, Apost)))
        # whole planes: 2, 4, .. columns
        curves["post planes"].append(cum(plane))
        curves["pre A after RoPE"].append(cum(e(gpost, Apre)))
    style = {"pre svd": ("SVD of queries before RoPE (not usable)", "black", "--"),
             "post none": ("no skew (mode none)", "tab:grey", "-"),
             "post svd": ("SVD after RoPE (mode svd)", "tab:blue", "-"),
             "post planes": ("whole RoPE planes (mode planes)", "tab:orange", "-"),
             "pre A after RoPE": ("A from before RoPE, applied after it", "tab:red", ":")}
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    cols = torch.arange(1, cfg.head_dim + 1)
    for k, (name, color, ls) in style.items():
        x = cols[1::2] if k == "post planes" else cols
        ax[0].plot(x, curves[k][10], color=color, ls=ls, label=name)
        ax[1].plot(x, torch.stack(curves[k][2:]).mean(0), color=color, ls=ls, label=name)
    for a, t in zip(ax, ("layer 10", f"mean of layers 2..{cfg.n_layers - 1}")):
        a.axvline(SK.n_columns(I.Policy().partial_ratio, cfg.head_dim, True), color="grey", ls=":", lw=1)
        a.set(xlabel="columns kept (largest energy first)", ylabel="share of query energy", ylim=(0, 1.01),
              xlim=(1, cfg.head_dim), title=f"query energy per column, {t}")
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save(fig, "06-energy.png")


# --- Chapter 7: recall of the engine
def fig_recall(model, ids, L):
    say("chapter 7: recall per layer of the infinigen policy (Policy(measure_recall=True)) ...")
    runs = [("planes, budget 0.1, alpha 8", dict(budget=0.1, alpha=8.0, skew="planes")),
            ("planes, budget 0.2, alpha 8", dict(budget=0.2, alpha=8.0, skew="planes")),
            ("planes, budget 0.2, alpha 4", dict(budget=0.2, alpha=4.0, skew="planes")),
            ("svd, budget 0.1, alpha 8", dict(budget=0.1, alpha=8.0, skew="svd")),
            ("none, budget 0.1, alpha 8", dict(budget=0.1, alpha=8.0, skew="none"))]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    for label, kw in runs:
        t = time.time()
        _, st = I.generate(model, [ids], I.Policy("infinigen", measure_recall=True, **kw),
                           max_new=STEPS, stop_ids=())
        r, f = st["recall_per_layer"], st["fetched_fraction_per_layer"]
        say(f"  {label}: mean recall of sparse layers {sum(r[2:]) / (L - 2):.3f}, "
            f"fetched {sum(f[2:]) / (L - 2):.3f} ({time.time() - t:.0f}s)")
        ls = "--" if "svd" in label or "none" in label else "-"
        ax[0].plot(range(L), r, ls, marker="o", ms=3, label=label)
        ax[1].plot(range(L), f, ls, marker="o", ms=3, label=label)
    ax[0].set(xlabel="layer", ylabel="true attention mass on fetched tokens", ylim=(0, 1.02),
              title=f"recall (layers 0, 1 dense), {PROMPT}-token prompt")
    ax[1].set(xlabel="layer", ylabel="share of past tokens fetched", yscale="log",
              title="what the speculation fetched")
    ax[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save(fig, "07-recall.png")


# --- Chapter 9: the bounded pool
def fig_pool(model, tok):
    say("chapter 9: pool misses against capacity for fifo, lru, counter ...")
    ids, new = lab.text_tokens(tok, 128), 48
    caps = [96, 112, 128, 144, 160]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for ev in ("fifo", "lru", "counter"):
        rate = []
        for cap in caps:
            _, st = I.generate(model, [ids],
                               I.Policy("infinigen", budget=0.2, alpha=8.0, capacity=cap, eviction=ev),
                               max_new=new, stop_ids=())
            rate.append(st["pool_misses"] / st["pool_requests"])
            say(f"  {ev} capacity {cap}: {st['pool_misses']} misses of {st['pool_requests']} requests")
        ax.plot(caps, rate, "o-", label=ev)
    ax.set(xlabel=f"pool capacity (tokens per layer; {len(ids) + new} in all)", ylabel="misses / requests",
           title="bounded CPU pool, infinigen budget 0.2, alpha 8")
    ax.legend()
    fig.tight_layout()
    save(fig, "09-pool.png")


def main(argv):
    """argv: chapter numbers to redraw (default: all)."""
    only = {int(a) for a in argv} or {4, 5, 6, 7, 9}
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    t = time.time()
    model, tok = M.load_with_tokenizer(None)
    L = model.cfg.n_layers
    ids = lab.text_tokens(tok, PROMPT)
    if only & {4, 5, 6}:
        say(f"recording a {PROMPT}-token prompt and {STEPS} greedy steps on the default model ...")
        rec = lab.record(model, ids, STEPS)
        if 4 in only:
            fig_sparsity(rec, L)
        if 5 in only:
            fig_layers(model, rec, L)
        if 6 in only:
            fig_skew(model, rec, L)
        del rec
    if 7 in only:
        fig_recall(model, ids, L)
    if 9 in only:
        fig_pool(model, tok)
    say(f"done in {time.time() - t:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
