"""The accuracy table's claim on texts the defaults were not chosen on: the default model, each text's first
2 windows of 2048 tokens, the last 512 left to the policy, policies at budgets 0.1 and 0.2 (every default
of eval.py otherwise). One `eval.py --json` child per row, its output kept in --work under the text's name
and a hash of its content, so a run that was stopped goes on where it was (a kept output that is not whole
is run again; after changing the engine, give a new --work). Writes results/eval-other-texts.json and
prints a table. Made by:

  python results/other_texts.py --texts gpl=/usr/share/common-licenses/GPL-3,\
argparse=/usr/lib/python3.11/argparse.py,pod=/usr/share/perl/5.36.0/Locale/Maketext.pod,\
nodejs=/usr/share/doc/nodejs/README.md
"""
import datetime
import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import cli  # noqa: E402

ROWS = [("infinigen", 0.1), ("h2o", 0.1), ("oracle", 0.1), ("streaming", 0.1),
        ("infinigen", 0.2), ("h2o", 0.2)]
KEYS = ("kl", "top1", "ppl", "ppl_full", "positions", "sparse_fraction")          # of eval.py --json
WINDOW = ["--context", "2048", "--windows", "2", "--decode", "512"]


def kept(path):
    """A row's kept eval.py output, or None: none yet, or not whole (a stopped or broken run)."""
    try:
        with open(path) as f:
            r = json.load(f)
        return r if isinstance(r, dict) and all(k in r for k in KEYS) else None
    except (OSError, ValueError):
        return None


def main():
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", required=True, help="comma list of NAME=FILE")
    p.add_argument("--work", default="/tmp/infinigen-other-texts", help="one JSON output per row, kept")
    p.add_argument("--out", default=os.path.join(HERE, "eval-other-texts.json"))
    args = p.parse_args()
    try:
        texts = [t.split("=", 1) for t in args.texts.split(",")]
        if any(len(t) != 2 or not all(t) for t in texts):
            raise ValueError(f"--texts {args.texts!r}: give NAME=FILE,NAME=FILE")
        texts = [(name, os.path.abspath(path)) for name, path in texts]      # the children run in ROOT
        for _, path in texts:
            cli.read_text(path, "--texts")                        # the one-line error of a bad file, now
        out = cli.writable(args.out)
        os.makedirs(args.work, exist_ok=True)
    except (ValueError, OSError) as e:
        cli.fail(e)
    rows = []
    for name, path in texts:
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:16]            # another text of that name: new rows
        for policy, budget in ROWS:
            cmd = ["python", "eval.py", "--text", path, *WINDOW, "--policy", policy, "--budget", str(budget)]
            done = os.path.join(args.work, f"{name}-{sha}-{policy}-{budget}.json")
            if kept(done) is None:
                print(f"{name}: {policy} at {budget} ...", file=sys.stderr, flush=True)
                with cli.whole(done) as tmp, open(tmp, "w") as f:
                    run = subprocess.run([sys.executable, *cmd[1:], "--json"], cwd=ROOT, stdout=f)
                    if run.returncode:
                        cli.fail(f"{' '.join(cmd)} exited with status {run.returncode}")
            r = kept(done)
            if r is None:
                cli.fail(f"{' '.join(cmd)} printed no measures (see {done})")
            rows.append({"text": name, "file": path, "policy": policy, "budget": budget,
                         "kl": round(r["kl"], 4), "top1": round(r["top1"], 3), "ppl": round(r["ppl"], 2),
                         "ppl_full": round(r["ppl_full"], 2), "positions": r["positions"],
                         "sparse_fraction": round(r["sparse_fraction"], 3), "command": " ".join(cmd)})
    for r in rows:
        print(f"{r['text']:>8} {r['policy']:>10} {r['budget']:<4} KL {r['kl']:.4f}  top-1 {r['top1']:.3f}  "
              f"ppl {r['ppl']:.2f} / {r['ppl_full']:.2f}")
    cli.write_json(out, {"date": str(datetime.date.today()), "rows": rows,
                         "made_by": "python results/other_texts.py --texts " + args.texts})
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    cli.run_script(main)
