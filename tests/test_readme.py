"""The README states the engine's line count per file and in total: keep it true."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_line_counts_match_the_files():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    stated = {f: int(n) for f, n in re.findall(r"\| `(\w+\.py)` \| (\d+) \|", text)}
    assert set(stated) == {"model.py", "skew.py", "offload.py", "kernel.py", "infinigen.py", "cli.py"}
    actual = {f: sum(1 for _ in open(os.path.join(ROOT, f), encoding="utf-8")) for f in stated}
    assert stated == actual, f"README says {stated}, the files have {actual}"
    assert max(actual.values()) < 500, f"a core file has grown past 500 lines: {actual}"
    total = int(re.search(r"\| \*\*engine\*\* \| \*\*(\d+)\*\* \|", text).group(1))
    assert total == sum(actual.values())


def test_readme_shows_the_two_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    first_screen = "\n".join(text.splitlines()[:20])
    assert "make demo" in first_screen and "make test" in first_screen
