"""Make every picture of the tutorial (tutorial/figures/*.png): drawings of the mechanism, and plots of
real runs on the default model.

  python tutorial/figures.py          (or: make figures)        progress on stderr; one thread
  python tutorial/figures.py 6 10     only the pictures of chapters 6 and 10

Each picture's caption in its chapter says what it shows. The drawings (chapters 1, 2, 5, 8, 13) take
their numbers from the engine where there are any (RoPE frequencies, the pool, results/timeline-*.json);
the plots recompute theirs here every time, on the CPU, in float32.
"""
import glob
import json
import math
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
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

import infinigen as I  # noqa: E402
import model as M  # noqa: E402
import skew as SK  # noqa: E402
from offload import Pool  # noqa: E402
from tutorial import lab  # noqa: E402

OUT = os.path.join(HERE, "figures")
PROMPT, STEPS = 1024, 32          # tokens of text, then greedy decode steps recorded
CPU_C, GPU_C, SEL_C, COPY_C = "#dbe8f6", "#e3f1dc", "tab:orange", "tab:red"


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def save(fig, name):
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    say(f"  wrote tutorial/figures/{name} ({os.path.getsize(path) // 1024} KB)")


def box(ax, x, y, w, h, text, color, size=9, **kw):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.6", fc=color,
                                ec="black", lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, wrap=True, **kw)


def arrow(ax, a, b, text="", color="black", ls="-", rad=0.0, size=8, where=0.5, dy=1.2):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color=color, lw=1.4, ls=ls,
                                 connectionstyle=f"arc3,rad={rad}"))
    if text:
        x, y = a[0] + where * (b[0] - a[0]), a[1] + where * (b[1] - a[1]) + dy
        ax.text(x, y, text, ha="center", va="bottom", fontsize=size, color=color)


# --- Chapter 1: one decode step
def fig_decode_step():
    say("chapter 1: drawing one decode step ...")
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    ax.set(xlim=(0, 105), ylim=(0, 48))
    ax.axis("off")
    box(ax, 1, 4, 40, 42, "", CPU_C)
    ax.text(21, 43.5, "CPU memory: the KV store (layers 2 .. L-1)", ha="center", fontsize=10, weight="bold")
    rows = ["layer 2", "layer 3", "...", "layer i", "layer i+1", "...", "layer L-1"]
    chosen = {1, 4, 5, 9, 12, 15}                        # the tokens speculation picks for layer i+1
    for r, name in enumerate(rows):
        y = 37 - 4.6 * r
        ax.text(9.5, y + 1.3, name, ha="right", va="center", fontsize=8)
        if name == "...":
            continue
        for t in range(16):
            c = SEL_C if name == "layer i+1" and t in chosen else "white"
            ax.add_patch(Rectangle((10.5 + 1.8 * t, y), 1.55, 2.6, fc=c, ec="grey", lw=0.5))
    ax.text(21, 5.6, "a cell: one past token's K and V (every KV head)\n"
            "orange: the rows chosen for layer i+1", ha="center", fontsize=8)
    box(ax, 62, 4, 42, 42, "", GPU_C)
    ax.text(83, 43.5, "GPU", ha="center", fontsize=10, weight="bold")
    box(ax, 63.5, 37, 39, 4.5, "layers 0, 1: whole K, V, resident (dense, no copy)", "white", 8)
    box(ax, 63.5, 30.5, 39, 5, "partial key cache: m of the d columns of every\npast key, layers 2 .. L-1",
        "white", 8)
    box(ax, 63.5, 23, 39, 5.5, "(1) speculate layer i+1: x_i @ partial Wq(i+1),\n"
        "RoPE, against its partial keys -> the best tokens", "#fff3d6", 8)
    box(ax, 63.5, 15.5, 39, 5.5, "(2) layer i: attention + MLP (compute stream);\n"
        "its new K, V are appended to the store", "#fff3d6", 8)
    box(ax, 63.5, 7, 39, 6, "(3) buffer of layer i+1: its chosen rows land here;\n"
        "layer i+1 waits for them, then attends", "white", 8)
    arrow(ax, (63.5, 25.5), (40, 20), "indices", "black", ls="--", where=0.45, dy=1.6)
    arrow(ax, (39.5, 18.2), (63.3, 10), "", COPY_C)
    ax.text(50.5, 11.8, "(4) copy of the\nchosen rows over\nPCIe (copy stream),\nwhile (2) runs",
            ha="center", va="top", fontsize=8, color=COPY_C)
    ax.text(52, 1.2, "Layer i+1's copy runs while layer i computes; the dense layers and the partial keys "
            "never cross the link.", ha="center", fontsize=8.5, style="italic")
    fig.tight_layout()
    save(fig, "01-decode-step.png")


# --- Chapter 2: a RoPE plane
def fig_rope(cfg):
    say("chapter 2: drawing a RoPE plane ...")
    inv = M.rope_inv_freq(cfg)                                          # (d/2,) radians per position
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.9), gridspec_kw={"width_ratios": [1, 1.5]})
    a = ax[0]
    a.add_patch(plt.Circle((0, 0), 1, fill=False, color="lightgrey"))
    q, k, theta = torch.tensor([0.95, 0.3]), torch.tensor([0.55, 0.75]), float(inv[0])
    rot = lambda v, ang: torch.tensor([v[0] * math.cos(ang) - v[1] * math.sin(ang),
                                       v[0] * math.sin(ang) + v[1] * math.cos(ang)])
    for p in range(4):
        v = rot(q, p * theta)
        a.annotate("", v.tolist(), (0, 0), arrowprops=dict(arrowstyle="-|>", color="tab:blue",
                                                            alpha=0.35 + 0.2 * p, lw=1.5))
        a.text(*(1.12 * v).tolist(), f"q @ {p}", fontsize=8, color="tab:blue", ha="center", va="center")
    kv = rot(k, 1 * theta)
    a.annotate("", kv.tolist(), (0, 0), arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=1.8))
    a.text(*(1.15 * kv).tolist(), "k @ 1", fontsize=8, color="tab:red", ha="center", va="center")
    a.set(xlim=(-1.35, 1.35), ylim=(-1.35, 1.35), aspect="equal", xticks=[], yticks=[],
          xlabel="dim j", ylabel="dim j + d/2", title=f"plane j = 0: turned by {theta:.2f} rad per position")
    a.text(0, -1.3, "q . k depends only on the angle between them:\nits positions' difference",
           ha="center", fontsize=8)
    turn = (2 * math.pi / inv).numpy()                                   # positions per full turn
    b = ax[1]
    b.semilogy(range(len(turn)), turn, "o-", ms=3, color="tab:blue")
    b.axhline(cfg.max_seq_len, color="black", ls="--", lw=1)
    b.text(0, cfg.max_seq_len * 1.3, f"the model's context, {cfg.max_seq_len} positions", fontsize=8)
    b.set(xlabel="plane j (dims j and j + d/2)", ylabel="positions per full turn",
          title=f"d = {cfg.head_dim}: {len(turn)} planes, each at its own speed (theta {cfg.rope_theta:g})")
    fig.tight_layout()
    save(fig, "02-rope-plane.png")


# --- Chapter 5: two streams
def gpu_timelines():
    """results/timeline-*.json files measured on a GPU (not the CPU twin)."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "timeline-*.json"))):
        d = json.load(open(path))
        if d.get("device", "cpu") != "cpu":
            out.append((os.path.basename(path), d))
    return out


def fig_streams():
    say("chapter 5: drawing the two-stream timeline, ideal beside measured ...")
    n, comp, copy = 6, 1.0, 0.7
    panels = [("one stream (naive offload): each layer copies its past, then computes", []),
              ("two streams (ideal): layer i+1's rows copy while layer i computes", [])]
    t = 0.0
    for i in range(n):                                           # serial: copy, then compute
        panels[0][1].append(("copy", i, t, t + copy))
        panels[0][1].append(("compute", i, t + copy, t + copy + comp))
        t += copy + comp
    done = 0.0
    panels[1][1].append(("copy", 0, 0.0, copy))
    ready = copy
    for i in range(n):                                           # layer i starts when its rows are there
        start = max(done, ready)
        panels[1][1].append(("compute", i, start, start + comp))
        if i + 1 < n:                                            # layer i+1's copy starts with layer i
            panels[1][1].append(("copy", i + 1, start + 0.1, start + 0.1 + copy))
            ready = start + 0.1 + copy
        done = start + comp
    measured = []
    cpu = os.path.join(ROOT, "results", "timeline-cpu.json")
    if os.path.exists(cpu):
        measured.append(("CPU twin (results/timeline-cpu.json): no second stream; each copy runs "
                         "inside the layer before", json.load(open(cpu))))
    measured += [(f"{d['device']}, measured ({name})", d) for name, d in gpu_timelines()]
    fig, axes = plt.subplots(len(panels) + len(measured), 1, figsize=(10.5, 1.55 * (2 + len(measured)) + 0.4))
    for ax, (title, spans) in zip(axes, panels):
        for kind, i, s, e in spans:
            row = 1 if kind == "compute" else 0
            ax.broken_barh([(s, e - s)], (row - 0.38, 0.76), fc=plt.cm.tab10(i % 10), ec="black", lw=0.5)
            ax.text((s + e) / 2, row, f"{'L' if kind == 'compute' else 'copy '}{i}", ha="center",
                    va="center", fontsize=7)
        two = title.startswith("two")
        ax.set(yticks=[0, 1], yticklabels=["copy stream" if two else "copies", "compute stream" if two else
                                           "compute"], xlim=(0, n * (copy + comp)), title=title, xticks=[])
        ax.title.set_fontsize(9)
    for ax, (title, d) in zip(axes[len(panels):], measured):
        run = d["runs"]["infinigen"]
        for row, key in ((1, "layers_ms"), (0, "copies_ms")):
            ax.broken_barh([(s, e - s) for _, s, e in run[key]], (row - 0.38, 0.76),
                           fc=[plt.cm.tab10(i % 10) for i, _, _ in run[key]], ec="black", lw=0.3)
        ax.set(yticks=[0, 1], yticklabels=["copies", "layers"], xlabel="ms",
               title=f"{title}; infinigen, B={d['batch']}, context {d['context']}, {d['date'][:10]}")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    save(fig, "05-streams.png")


# --- Chapter 6: sparsity and its movement
def fig_sparsity(rec, L):
    say("chapter 6: tokens holding 90% of the attention, and how the set moves ...")
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
    save(fig, "06-sparsity.png")

    lags = list(range(1, STEPS // 2 + 1))
    kept = torch.zeros(L, len(lags))
    for i in range(L):
        for j, lag in enumerate(lags):
            kept[i, j] = torch.stack([sum(lab.kept_mass(rec.p[i][s + lag], lab.top_set(rec.p[i][s]))).mean()
                                      for s in range(STEPS - lag)]).mean()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    im = ax.imshow(kept.numpy(), aspect="auto", cmap="viridis", vmin=0.3, vmax=0.95, origin="lower",
                   extent=(lags[0] - 0.5, lags[-1] + 0.5, -0.5, L - 0.5))
    fig.colorbar(im, label="mass on the old set + the tokens since")
    ax.set(xlabel="steps after the set was chosen", ylabel="layer",
           title="the 90% set of one step, read k steps later")
    fig.tight_layout()
    save(fig, "06-drift.png")


# --- Chapter 7: consecutive layers
def fig_layers(model, rec, L):
    say("chapter 7: similarity of consecutive attention inputs; speculating from the layer before ...")
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
    save(fig, "07-layers.png")


# --- Chapter 8: skewing
def fig_skew_rotation():
    say("chapter 8: drawing the skew rotation ...")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 2, generator=g) * torch.tensor([1.0, 0.18])              # one long direction
    ang = math.radians(35)
    R = torch.tensor([[math.cos(ang), math.sin(ang)], [-math.sin(ang), math.cos(ang)]])
    q = z @ R                                                                      # (N, 2) the queries
    k = torch.tensor([0.9, -0.2])                                                  # one key
    A = SK.svd_skew(q[None])[0]                                                    # (2, 2) orthogonal
    A = A * torch.sign(A[0, 0])                                                    # (a sign is free)
    fig, ax = plt.subplots(1, 2, figsize=(9.6, 4.1))
    for a, (qq, kk, title) in zip(ax, ((q, k, "queries as they come"),
                                       (q @ A, k @ A, "after the rotation A (q A, k A)"))):
        e = qq.pow(2).mean(0)
        a.scatter(qq[:, 0], qq[:, 1], s=5, color="tab:blue", alpha=0.5, label="queries q")
        a.annotate("", kk.tolist(), (0, 0), arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=2))
        a.text(kk[0] + 0.05, kk[1] + 0.12, "key k", color="tab:red", fontsize=9)
        a.axhline(0, color="lightgrey", lw=0.8)
        a.axvline(0, color="lightgrey", lw=0.8)
        a.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=title,
              xlabel=f"column 1: {e[0] / e.sum():.0%} of the energy",
              ylabel=f"column 2: {e[1] / e.sum():.0%}")
        a.text(-2.9, -2.85, f"q0 . k = {float(qq[0] @ kk):.3f}", fontsize=9)
    for v in A.T:                                                                  # A's columns, on the left
        ax[0].annotate("", (2.4 * v).tolist(), (0, 0),
                       arrowprops=dict(arrowstyle="-|>", color="black", lw=1, ls="--"))
    ax[0].text(-2.9, 2.5, "dashed: the columns of A (SVD of the queries)", fontsize=8)
    ax[1].text(-2.9, 2.5, "same scores; one column now predicts them", fontsize=8)
    fig.tight_layout()
    save(fig, "08-skew-rotation.png")


def fig_skew(model, rec, L):
    say("chapter 8: energy per column, with and without skew, before and after RoPE ...")
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
        curves["post planes"].append(cum(plane))                                       # 2, 4, .. columns
        curves["pre A after RoPE"].append(cum(e(gpost, Apre)))
    style = {"pre svd": ("SVD of queries before RoPE (not usable)", "black", "--"),
             "post none": ("no skew (mode none)", "tab:green", "-"),
             "post svd": ("SVD after RoPE (mode svd)", "tab:blue", "-"),
             "post planes": ("whole RoPE planes (mode planes)", "tab:orange", "-"),
             "pre A after RoPE": ("A from before RoPE, applied after it", "tab:red", ":")}
    m = SK.n_columns(I.Policy().partial_ratio, cfg.head_dim, True)
    m_paper = SK.n_columns(I.PAPER["partial_ratio"], cfg.head_dim, False)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    cols = torch.arange(1, cfg.head_dim + 1)
    for k, (name, color, ls) in style.items():
        x = cols[1::2] if k == "post planes" else cols
        ax[0].plot(x, curves[k][10], color=color, ls=ls, label=name)
        ax[1].plot(x, torch.stack(curves[k][2:]).mean(0), color=color, ls=ls, label=name)
    for a, t in zip(ax, ("layer 10", f"mean of layers 2..{cfg.n_layers - 1}")):
        a.axvline(m, color="tab:purple", ls="-.", lw=1, label=f"m = {m} (engine default)")
        a.axvline(m_paper, color="tab:brown", ls="-.", lw=1, label=f"m = {m_paper} (--paper, r 0.2)")
        a.set(xlabel="columns kept (largest energy first)", ylabel="share of query energy", ylim=(0, 1.01),
              xlim=(1, cfg.head_dim), title=f"query energy per column, {t}")
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save(fig, "08-energy.png")


# --- Chapter 10: recall of the engine
def fig_recall(model, ids, L):
    say("chapter 10: recall per layer of the infinigen policy (Policy(measure_recall=True)) ...")
    runs = [("defaults: planes, r 0.5, alpha inf, budget 0.2, layers by prompt", I.Policy("infinigen")),
            ("the same, layers uniform", I.Policy("infinigen", layer_budget="uniform")),
            ("defaults at budget 0.1", I.Policy("infinigen", budget=0.1)),
            ("alpha 4, budget 0.2, layers uniform", I.Policy("infinigen", alpha=4.0, layer_budget="uniform")),
            ("--paper: svd, r 0.2, alpha 4, budget 0.2, uniform", I.Policy.paper())]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, pol in runs:
        t = time.time()
        pol.measure_recall = True
        _, st = I.generate(model, [ids], pol, max_new=STEPS, stop_ids=())
        r, f = st["recall_per_layer"], st["fetched_fraction_per_layer"]
        say(f"  {label}: mean recall of sparse layers {sum(r[2:]) / (L - 2):.3f}, "
            f"fetched {sum(f[2:]) / (L - 2):.3f} ({time.time() - t:.0f}s)")
        ls = "--" if pol.layer_budget == "uniform" else "-"
        ax[0].plot(range(L), r, ls, marker="o", ms=3, label=label)
        ax[1].plot(range(L), f, ls, marker="o", ms=3, label=label)
    ax[0].set(xlabel="layer", ylabel="true attention mass on fetched tokens", ylim=(0, 1.02),
              title=f"recall (layers 0, 1 dense), {PROMPT}-token prompt")
    ax[1].set(xlabel="layer", ylabel="share of past tokens fetched", yscale="log",
              title="what each layer fetched (solid: shares by prompt)")
    ax[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save(fig, "10-recall.png")


# --- Chapter 13: the bounded pool
def toy_pools():
    """The toy of chapter 13: four slots, tokens 0..3 fetched (4, 1, 2, 0) times, then tokens 4 and 5."""
    out = {}
    for policy in ("fifo", "lru", "counter"):
        pool = Pool(n_layers=1, batch=1, tokens=8, capacity=4, policy=policy)
        for t in range(4):
            pool.admit(0, t, torch.ones(1, 1, dtype=torch.bool))
        for tokens in ((0, 2), (0, 2), (0,), (0,), (1,)):
            idx = torch.tensor([[list(tokens)]])
            pool.touch(0, idx, torch.ones_like(idx, dtype=torch.bool))
        before = (pool.owner[0, 0].tolist(), pool.fetches[0, 0, :4].tolist())
        for t in (4, 5):
            pool.admit(0, t, torch.ones(1, 1, dtype=torch.bool))
        out[policy] = before, pool.owner[0, 0].tolist(), [t for t in range(4) if pool.where[0, 0, t] < 0]
    return out


def fig_pool_slots():
    say("chapter 13: drawing the pool's slots ...")
    pools = toy_pools()
    fig, ax = plt.subplots(figsize=(9.5, 3.6))
    ax.set(xlim=(0, 95), ylim=(0, 36))
    ax.axis("off")
    (owner, fetches), _, _ = pools["fifo"]
    rows = [("full, before tokens 4 and 5", owner, [])] + [(f"{p}: after 4 and 5", after, gone)
                                                            for p, (_, after, gone) in pools.items()]
    for r, (name, owner, gone) in enumerate(rows):
        y = 29 - 8 * r
        ax.text(21, y + 2.2, name, ha="right", va="center", fontsize=9)
        for p, t in enumerate(owner):
            new = t >= 4
            ax.add_patch(Rectangle((23 + 11 * p, y), 10, 4.4, fc="#fff3d6" if new else CPU_C, ec="black"))
            ax.text(28 + 11 * p, y + 2.9, f"token {t}", ha="center", fontsize=8.5)
            ax.text(28 + 11 * p, y + 1.0, "new" if new else f"fetched {fetches[t]}x", ha="center",
                    fontsize=7.5)
        if r == 0:
            for p in range(4):
                ax.text(28 + 11 * p, y + 5.2, f"slot {p}", ha="center", fontsize=8, color="grey")
        else:
            ax.text(69, y + 2.2, "evicted: " + ", ".join(f"token {t}" for t in gone), va="center",
                    fontsize=8.5, color=COPY_C)
    ax.text(47, 0.5, "fifo: the oldest; lru: the least recently fetched; counter: the least fetched of the "
            "older half", ha="center", fontsize=8, style="italic")
    fig.tight_layout()
    save(fig, "13-pool-slots.png")


def fig_pool(model, tok):
    say("chapter 13: pool misses against capacity for fifo, lru, counter ...")
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
    save(fig, "13-pool-misses.png")


def main(argv):
    """argv: chapter numbers to redraw (default: all)."""
    only = {int(a) for a in argv} or {1, 2, 5, 6, 7, 8, 10, 13}
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    t = time.time()
    if 1 in only:
        fig_decode_step()
    if 5 in only:
        fig_streams()
    if 8 in only:
        fig_skew_rotation()
    if 13 in only:
        fig_pool_slots()
    if not only & {2, 6, 7, 8, 10, 13}:
        return say(f"done in {time.time() - t:.0f}s")
    model, tok = M.load_with_tokenizer(None)
    L = model.cfg.n_layers
    ids = lab.text_tokens(tok, PROMPT)
    if 2 in only:
        fig_rope(model.cfg)
    if only & {6, 7, 8}:
        say(f"recording a {PROMPT}-token prompt and {STEPS} greedy steps on the default model ...")
        rec = lab.record(model, ids, STEPS)
        if 6 in only:
            fig_sparsity(rec, L)
        if 7 in only:
            fig_layers(model, rec, L)
        if 8 in only:
            fig_skew(model, rec, L)
        del rec
    if 10 in only:
        fig_recall(model, ids, L)
    if 13 in only:
        fig_pool(model, tok)
    say(f"done in {time.time() - t:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
