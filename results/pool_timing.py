"""What the bounded pool costs on the CPU: `infinigen` on the default model, float32, a left-padded batch
of prompts cut from one text, generated without a pool and with a pool at --capacity of the context.
Prints one line per run and writes results/pool-timing.json. Made by (issue 12):

  python results/pool_timing.py --prompts 2048,1900,1700,1536 --new 257     # 2048-token prefill, 256 steps
"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cli  # noqa: E402
import infinigen as I  # noqa: E402
import model as M  # noqa: E402
import prepare  # noqa: E402


def main():
    p = cli.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", default="2048,1900,1700,1536", help="prompt lengths in tokens, one each")
    p.add_argument("--new", type=cli.positive_int, default=257, help="new tokens (decode steps + 1)")
    p.add_argument("--capacity", type=float, default=0.8, help="the pool, a fraction of the context")
    p.add_argument("--eviction", choices=["fifo", "lru", "counter"], default="counter")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="the prompts' text")
    p.add_argument("--out", default=os.path.join(HERE, "pool-timing.json"))
    args = p.parse_args()
    try:
        run(args, cli.writable(args.out))
    except cli.KNOWN as e:                 # bad lengths, capacity or text; a results file not written
        cli.fail(e)


def run(args, out):
    lengths = [int(n) for n in args.prompts.split(",")]
    pols = [("no pool", I.Policy("infinigen")),
            (f"pool {args.capacity:g} {args.eviction}",
             I.Policy("infinigen", capacity=args.capacity, eviction=args.eviction))]
    m, folder = M.load(prepare.prepare(), "cpu", torch.float32)
    ids = M.Tok(folder).encode(cli.read_text(args.text, "--text"), chat=False)
    prompts = [ids[i * 97:i * 97 + n] for i, n in enumerate(lengths)]
    if min(map(len, prompts)) < min(lengths):
        raise ValueError(f"{args.text} is too short for prompts of {max(lengths)} tokens")
    rows = []
    for name, pol in pols:
        t = time.perf_counter()
        _, st = I.generate(m, prompts, pol, args.new)
        row = dict(run=name, total_s=round(time.perf_counter() - t, 2), prefill_s=round(st["prefill_s"], 2),
                   decode_s=round(st["decode_s"], 2), decode_steps=st["decode_steps"],
                   pool_misses=st.get("pool_misses"), pool_requests=st.get("pool_requests"))
        rows.append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    cli.write_json(out, dict(command="python results/pool_timing.py " + " ".join(sys.argv[1:]),
                             date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(),
                             prompts=lengths, new_tokens=args.new, rows=rows))


if __name__ == "__main__":
    cli.run_script(main)
