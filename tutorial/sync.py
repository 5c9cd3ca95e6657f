"""Keep the tutorial's engine code true: included blocks are the source's current text.

A fenced block right after the line `<!-- include: FILE#Section Name -->` holds the section
`# --- Section Name` of FILE (relative to the repository root): from its banner line to the next
banner (at any indentation) or the end of the file, without trailing blank lines.

  python tutorial/sync.py           rewrite the included blocks of every chapter from the source
  python tutorial/sync.py --check   exit 1, naming each block that differs (or names no section)
"""
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
INCLUDE = re.compile(r"^<!-- include: (?P<file>[^#]+)#(?P<section>.+?) -->$")
OUTPUT = "<!-- output -->"
BANNER = re.compile(r"^\s*# --- (?P<name>.+?)\s*$")


def chapters():
    """The chapter files in reading order: tutorial/NN-*.md."""
    return sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]-*.md")))


def blocks(lines):
    """Fenced blocks of a chapter (a list of lines): dicts with lang, the marker line before the
    fence (or None), `open` and `close` (line indexes of the fences) and `body` (lines between)."""
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: unclosed code fence")
        marker = lines[i - 1].strip() if i > 0 and lines[i - 1].startswith("<!--") else None
        out.append({"lang": m.group(1), "marker": marker, "open": i, "close": j, "body": lines[i + 1:j]})
        i = j + 1
    return out


def include_of(block):
    """(file, section) when the block is marked as an include, else None."""
    m = INCLUDE.match(block["marker"] or "")
    return (m.group("file").strip(), m.group("section").strip()) if m else None


def runnable(block):
    """The chapter's own code: python blocks with no marker."""
    return block["lang"] == "python" and block["marker"] is None


def section(file, name):
    """The text of section `# --- name` of file, as lines; ValueError when it is not there once."""
    path = os.path.join(ROOT, file)
    if not os.path.exists(path):
        raise ValueError(f"{file}: no such file")
    lines = open(path, encoding="utf-8").read().splitlines()
    starts = [i for i, line in enumerate(lines) if (m := BANNER.match(line)) and m.group("name") == name]
    if len(starts) != 1:
        raise ValueError(f"{file}: {'no' if not starts else len(starts)} section banner '# --- {name}'")
    end = next((i for i in range(starts[0] + 1, len(lines)) if BANNER.match(lines[i])), len(lines))
    body = lines[starts[0]:end]
    while body and not body[-1].strip():
        body.pop()
    return body


def sync(path, write):
    """Replace the included blocks of one chapter; return the problems found (stale or missing)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    problems, new = [], lines[:]
    for b in reversed(blocks(lines)):     # from the end, so earlier indexes stay valid
        inc = include_of(b)
        if inc is None:
            continue
        where = f"{os.path.basename(path)}:{b['open'] + 1} ({inc[0]}#{inc[1]})"
        try:
            want = section(*inc)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if b["body"] != want:
            problems.append(f"{where}: differs from the source")
            new[b["open"] + 1:b["close"]] = want
    if write and new != lines:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(new) + "\n")
    return problems


def main(argv):
    check = "--check" in argv
    problems = [p for path in chapters() for p in sync(path, write=not check)]
    for p in problems:
        print(("stale: " if check else "updated: ") + p if "differs" in p else "error: " + p, file=sys.stderr)
    missing = [p for p in problems if "differs" not in p]
    return 1 if (check and problems) or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
