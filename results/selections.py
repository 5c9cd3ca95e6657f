"""Every decode selection, greedy token, fetched share and logit of eight policy runs on the default model,
to check that a change of the engine's arithmetic moves none of them (the CPU results stay put). Record a
commit's, record after the change, compare:

  python results/selections.py record /tmp/before.pt        # at the old commit (or a worktree of it)
  python results/selections.py record /tmp/after.pt
  python results/selections.py compare /tmp/before.pt /tmp/after.pt

Three prompts cut from prompts/demo.txt, 24 new tokens each (644 selections per sparse policy); a selection
is compared by the slots it keeps per (sequence, KV head), not by its padding; the logits of every forward
(prefill and each step) by a digest of their bytes: bit for bit (recordings made before 2026-12-04 lack them).
INFINIGEN_SLOTS=kernel records with InfiniGen's selection kernel, =fused with its speculation fused too
(Triton's interpreter: minutes per run; 15 for `infinigen 0.1` with fused); INFINIGEN_DTYPE=float16 (or
bfloat16) runs the model in that dtype; INFINIGEN_RUNS="paper,infinigen 0.1" records those runs only.
Where selections differ, compare says how many of the heads' selections are the same and their mean
Jaccard overlap, up to each sequence's first different token.
"""
import hashlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cli  # noqa: E402
import infinigen as I  # noqa: E402
import model as M  # noqa: E402
import skew as SK  # noqa: E402

POLICIES = {"infinigen 0.1": dict(name="infinigen", budget=0.1), "infinigen alpha 2": dict(name="infinigen",
            alpha=2.0), "oracle 0.1": dict(name="oracle", budget=0.1), "infinigen with a pool":
            dict(name="infinigen", budget=0.15, capacity=0.8), "h2o 0.1": dict(name="h2o", budget=0.1),
            "streaming 0.1": dict(name="streaming", budget=0.1), "offload": dict(name="offload")}


def setting(name, choices):  # an environment variable's value, the first choice when unset; else refused
    v = os.environ.get(name, choices[0])
    if v not in choices:
        cli.fail(f"{name}={v!r}: choose from {', '.join(choices)}")
    return v


def record(path):
    SK.SLOTS = setting("INFINIGEN_SLOTS", ("torch", "kernel", "fused"))  # (commits before the kernel: unread)
    dtype = getattr(torch, setting("INFINIGEN_DTYPE", ("float32", "float16", "bfloat16")))
    model, tok = M.load_with_tokenizer(None, dtype=dtype)
    text = open(os.path.join(os.path.dirname(HERE), "prompts", "demo.txt")).read()
    prompts = [tok.encode(text[:1500]), tok.encode(text[1500:2600]), tok.encode(text[600:1400])]
    pols = {"paper": I.Policy.paper()} | {k: I.Policy(**v) for k, v in POLICIES.items()}
    if os.environ.get("INFINIGEN_RUNS"):                                 # some of the runs only, by name
        names = os.environ["INFINIGEN_RUNS"].split(",")
        if unknown := [k for k in names if k not in pols]:
            cli.fail(f"INFINIGEN_RUNS: no run {unknown[0]!r} (choose from {', '.join(pols)})")
        pols = {k: pols[k] for k in names}
    seen, plan = [], I.OffloadCache.plan

    def spy(self, layer, *a, **k):                          # each decode step's selection, as planned
        p = plan(self, layer, *a, **k)
        if p is not None and self.decoding:
            seen.append((layer, p[0].tolist(), p[1].tolist()))
        return p
    I.OffloadCache.plan = spy
    logits = []                                                    # a digest of each forward's logits
    digest = lambda o: hashlib.sha1(o.detach().contiguous().view(torch.uint8).numpy()).hexdigest()  # noqa: E731
    model.lm_head.register_forward_hook(lambda m, i, o: logits.append(digest(o)))
    out = {}
    for name, pol in pols.items():
        seen.clear(), logits.clear()
        ids, st = I.generate(model, prompts, pol, max_new=24)
        out[name] = {"tokens": ids, "selections": list(seen), "fetched": st["fetched_fraction_per_layer"],
                     "logits": list(logits)}
        print(f"{name:24s} {len(seen)} selections, first tokens {ids[0][:6]}", flush=True)
    torch.save(out, path)
    print(f"wrote {path}")


def overlap(a, b, tokens_a, tokens_b, layers):
    """Two runs' kept slots (compare's `chosen`) per sequence and KV head, up to each sequence's first
    different token: how many are the same, of how many, and their mean Jaccard overlap."""
    first = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
             for x, y in zip(tokens_a, tokens_b)]
    same = n = 0
    jac = 0.0
    for i, ((_, sa), (_, sb)) in enumerate(zip(a, b)):
        for s, (ha, hb) in enumerate(zip(sa, sb)):              # step i // layers makes token i // layers + 1
            if i // layers + 1 < first[s]:
                for x, y in zip(map(set, ha), map(set, hb)):
                    same, n, jac = same + (x == y), n + 1, jac + len(x & y) / max(len(x | y), 1)
    return same, n, jac / max(n, 1)


def load(path):
    """A recording of `record`: {run: {"tokens", "selections", "fetched", "logits"}}; else one error line."""
    try:
        rec = torch.load(path)
    except Exception as e:                              # not a torch file, or one holding other objects
        cli.fail(f"{path} is not a recording of `record`: {str(e).splitlines()[0][:100]}")
    keys = {"tokens", "selections", "fetched"}
    if not isinstance(rec, dict) or not all(isinstance(r, dict) and keys <= set(r) for r in rec.values()):
        cli.fail(f"{path} is not a recording of `record` (no runs of tokens, selections, fetched)")
    return rec


def compare(a, b):
    for f in (a, b):
        if not os.path.isfile(f):
            cli.fail(f"no recording {f}: make it with `record`")
    a, b = load(a), load(b)
    chosen = lambda sel: [(layer, [[[i for i, o in zip(ih, oh) if o] for ih, oh in zip(ib, ob)]     # noqa: E731
                                   for ib, ob in zip(idx, ok)]) for layer, idx, ok in sel]   # padding aside
    same = True
    for name in a:
        if name not in b:
            print(f"{name:24s} not in the second recording")
            same = False
            continue
        got = {k: (a[name][k], b[name][k]) for k in ("tokens", "selections", "fetched", "logits")
               if k != "logits" or "logits" in a[name] and "logits" in b[name]}
        got["selections"] = tuple(chosen(s) for s in got["selections"])
        eq = {k: x == y for k, (x, y) in got.items()}
        same &= all(eq.values())
        print(f"{name:24s} " + ", ".join(f"{k} {'same' if v else 'DIFFERENT'}" for k, v in eq.items()))
        if not eq["selections"]:
            layers = len({sel[0] for sel in a[name]["selections"]})                  # sparse layers per step
            same_, n, jac = overlap(*got["selections"], *got["tokens"], layers)
            print(f"{'':24s} {same_} of {n} head selections the same ({same_ / max(n, 1):.4f}), "
                  f"mean Jaccard overlap {jac:.4f}")
    return same


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        cli.run_script(lambda: record(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(0 if compare(sys.argv[2], sys.argv[3]) else 1)
    else:
        cli.fail("usage: python results/selections.py record FILE, or compare FILE FILE")
