"""The tutorial stays true: every chapter's code runs on the default model, every included block is
the engine's current section text, every included section and every picture exists. CPU."""
import gc
import os
import re

import pytest

from helpers import default_model_available
from tutorial import run, sync

CHAPTERS = sync.chapters()
ROOT = sync.ROOT


def test_there_are_chapters_and_the_readme_lists_them_in_order():
    names = [os.path.basename(p) for p in CHAPTERS]
    assert len(names) >= 10, names
    readme = open(os.path.join(sync.HERE, "README.md"), encoding="utf-8").read()
    where = [readme.find(f"({n})") for n in names]
    assert all(w >= 0 for w in where), [n for n, w in zip(names, where) if w < 0]
    assert where == sorted(where), "tutorial/README.md lists the chapters out of order"


@pytest.mark.parametrize("path", CHAPTERS, ids=os.path.basename)
def test_chapter_runs(path, capsys):
    if not default_model_available():
        pytest.skip("the chapters run the default model, which is not prepared and cannot be here")
    printed = run.run_chapter(path)
    assert printed, f"{os.path.basename(path)} has no runnable block"
    gc.collect()


def test_included_sections_exist():
    missing = []
    for path in CHAPTERS:
        lines = open(path, encoding="utf-8").read().splitlines()
        for b in sync.blocks(lines):
            if b["marker"] and b["marker"].startswith("<!-- include") and sync.include_of(b) is None:
                missing.append(f"{os.path.basename(path)}:{b['open']}: malformed marker {b['marker']!r}")
            inc = sync.include_of(b)
            if inc is None:
                continue
            try:
                sync.section(*inc)
            except ValueError as e:
                missing.append(f"{os.path.basename(path)}:{b['open']}: {e}")
    assert not missing, "\n".join(missing)


def test_sync_check_passes():
    stale = [p for path in CHAPTERS for p in sync.sync(path, write=False)]
    assert not stale, "run `python tutorial/sync.py`:\n" + "\n".join(stale)


def test_section_is_banner_to_next_banner(tmp_path, monkeypatch):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n# --- A\na = 1\n\n    # --- B\n    b = 2\n\n\n# --- C\nc = 3\n")
    monkeypatch.setattr(sync, "ROOT", str(tmp_path))
    assert sync.section("m.py", "A") == ["# --- A", "a = 1"]
    assert sync.section("m.py", "B") == ["    # --- B", "    b = 2"]
    assert sync.section("m.py", "C") == ["# --- C", "c = 3"]
    with pytest.raises(ValueError):
        sync.section("m.py", "D")


def test_figures_exist_are_small_and_have_a_command_in_their_caption():
    problems = []
    for path in CHAPTERS:
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)\n\n\*([^*]+)\*", text):
            png, caption = os.path.join(sync.HERE, m.group(1)), m.group(2)
            if not os.path.exists(png):
                problems.append(f"{m.group(1)}: missing (make figures)")
            elif os.path.getsize(png) > 200_000:
                problems.append(f"{m.group(1)}: {os.path.getsize(png)} bytes")
            if "tutorial/figures.py" not in caption:
                problems.append(f"{m.group(1)}: the caption names no command")
        if text.count("](figures/") != len(re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)\n\n\*", text)):
            problems.append(f"{os.path.basename(path)}: a picture without a caption right under it")
    assert not problems, "\n".join(problems)
