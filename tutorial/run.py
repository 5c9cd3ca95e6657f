"""Run a chapter's code: its ```python blocks with no include marker, top to bottom, in one
namespace, from the repository root (which is on sys.path), on one CPU thread.

  python tutorial/run.py tutorial/06-attention-is-sparse.md     run one chapter, printing its output
  python tutorial/run.py --write [CHAPTER ...]                   also refresh its output blocks

An output block is a ```text fence right after the line `<!-- output -->`; it shows what the
runnable block before it printed the last time the chapter was run with --write.
"""
import argparse
import contextlib
import io
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tutorial import sync  # noqa: E402


class Tee(io.StringIO):
    """Collects what a block prints and passes it on."""
    def __init__(self, out):
        super().__init__()
        self.out = out

    def write(self, s):
        self.out.write(s)
        return super().write(s)


def run_chapter(path, write=False, threads=1, echo=None):
    """Execute the runnable blocks of one chapter; with write, refresh its output blocks."""
    import torch
    torch.set_num_threads(threads)
    lines = open(path, encoding="utf-8").read().splitlines()
    bl = sync.blocks(lines)
    ns, printed, cwd = {"__name__": "__chapter__"}, {}, os.getcwd()
    os.chdir(ROOT)
    try:
        for n, b in enumerate(bl):
            if not sync.runnable(b):
                continue
            code = "\n" * (b["open"] + 1) + "\n".join(b["body"]) + "\n"   # tracebacks give the .md line
            out = Tee(echo or sys.stdout)
            with contextlib.redirect_stdout(out):
                exec(compile(code, path, "exec"), ns)
            printed[n] = out.getvalue()
    finally:
        os.chdir(cwd)
    if write:
        new = lines[:]
        for n, b in reversed(list(enumerate(bl))):
            if b["marker"] == sync.OUTPUT:
                src = max((k for k in printed if k < n), default=None)
                if src is None:
                    raise ValueError(f"{path}:{b['open'] + 1}: "
                                     "an output block with no runnable block before it")
                new[b["open"] + 1:b["close"]] = printed[src].rstrip("\n").splitlines()
        if new != lines:
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(new) + "\n")
    return printed


def main(argv):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="with no chapter: every chapter, in order")
    p.add_argument("chapters", nargs="*", help="tutorial/NN-*.md files")
    p.add_argument("--write", action="store_true", help="also refresh the chapters' output blocks")
    args = p.parse_args(argv)                   # --help, or a flag misspelt, runs nothing
    for path in args.chapters:
        if not os.path.isfile(path):
            p.error(f"no chapter {path}")
    for path in args.chapters or sync.chapters():
        print(f"== {os.path.relpath(path, ROOT)}", file=sys.stderr)
        run_chapter(path, args.write)


if __name__ == "__main__":
    main(sys.argv[1:])
