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


# --- Exercises: every chapter's solutions (tutorial/solutions.py), checked against the engine
def test_every_exercise_names_a_solution_and_every_solution_is_checked():
    from tutorial import solutions
    named = set()
    for path in CHAPTERS:
        text = open(path, encoding="utf-8").read()
        assert "## What this chapter taught" in text or "## What this appendix taught" in text, path
        assert text.count("## Exercises") == 1, path
        found = set(re.findall(r"\(`(ex\d\d_\d)`\)", text[text.index("## Exercises"):]))
        chapter = os.path.basename(path)[:2]
        assert found and all(f.startswith(f"ex{chapter}_") for f in found), (path, found)
        named |= found
    defined = {n for n in dir(solutions) if re.fullmatch(r"ex\d\d_\d", n)}
    tested = {n[len("test_solution_"):] for n in globals() if n.startswith("test_solution_")}
    assert named == defined == tested, (named ^ defined, defined ^ tested)


@pytest.fixture(scope="module")
def lm():
    if not default_model_available():
        pytest.skip("the solutions run the default model, which is not prepared and cannot be here")
    import model as M
    return M.load_with_tokenizer(None)


@pytest.fixture(scope="module")
def rec(lm):
    from tutorial import lab
    return lab.record(lm[0], lab.text_tokens(lm[1], 128), 2)


def test_solution_ex01_1(lm):
    import infinigen as I
    from tutorial import lab, solutions
    model, tok = lm
    _, st = I.generate(model, [lab.text_tokens(tok, 300)], I.Policy("infinigen", layer_budget="uniform"),
                       max_new=5, stop_ids=())
    assert st["decode_steps"] == 4 and solutions.ex01_1(model) == st["h2d_bytes_per_step"]


def test_solution_ex01_2():
    import cli
    from tutorial import solutions
    paper = vars(cli.parse_args(cli.build_parser(), ["--paper"]))
    plain = vars(cli.parse_args(cli.build_parser(), []))
    import infinigen as I
    assert solutions.ex01_2() == {k: paper[k] for k in I.PAPER if paper[k] != plain[k]}
    assert set(solutions.ex01_2()) == {"skew", "partial_ratio", "alpha", "layer_budget", "head_count"}


def test_solution_ex02_1(lm):
    from tutorial import solutions
    plane, dim = solutions.ex02_1(lm[0].cfg)
    assert plane < 1e-5 and dim > 1e-2


def test_solution_ex02_2(lm):
    from tutorial import solutions
    model = lm[0]
    assert solutions.ex02_2(model.cfg) == sum(p.numel() for p in model.layers[0].parameters())


def test_solution_ex03_1(lm):
    import torch

    import model as M
    from tutorial import solutions
    cfg = lm[0].cfg
    c = M.DenseCache(cfg, 1, 4096, "cpu", torch.float32)
    assert solutions.ex03_1(cfg) == (c.k.numel() + c.v.numel()) * 4


def test_solution_ex03_2(lm):
    from tutorial import solutions
    assert solutions.ex03_2(*lm) < 1e-4


def test_solution_ex04_1():
    import model as M
    from tutorial import solutions
    cfg = M.Config.from_hf(dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                max_position_embeddings=8192))
    assert solutions.ex04_1() == cfg.kv_bytes_per_token


def test_solution_ex04_2():
    import torch

    import model as M
    from tutorial import solutions
    cfg = M.Config.from_hf(dict(model_type="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                                max_position_embeddings=4096))
    with torch.device("meta"):
        weights = 2 * sum(p.numel() for p in M.Transformer(cfg).parameters())
    fits = lambda b: weights + b * 4096 * cfg.kv_bytes_per_token <= 80e9
    b = solutions.ex04_2()
    assert fits(b) and not fits(b + 1)


def test_solution_ex05_1(lm):
    from tutorial import solutions
    naive, engine = solutions.ex05_1(*lm)
    assert naive == engine > 0


def test_solution_ex05_2():
    import torch

    from offload import KVStore, kv_rows
    from tutorial import solutions
    got = []
    for gather in ("host", "device"):
        store = KVStore(n_layers=2, batch=1, slots=8, n_kv=2, head_dim=4, device=torch.device("cpu"),
                        dtype=torch.float32, gather=gather)
        store.append(0, 0, kv_rows(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)))
        idx = torch.tensor([[[0, 3], [2, 4]]])
        store.take(store.fetch(0, t0=5, idx=idx, ok=torch.ones_like(idx, dtype=torch.bool)))
        got.append(store.ledger.h2d_per_layer()[0])
    assert solutions.ex05_2() == tuple(got)


def test_solution_ex06_1(rec):
    import torch

    import skew as SK
    from tutorial import solutions
    for (recent, best), ps in zip(solutions.ex06_1(rec), rec.p):
        p = ps[-1]
        t = p.shape[-1] - 1
        pick = SK.topk_mask(p[None, :, :t], torch.tensor([max(1, round(0.1 * t))]),
                            torch.ones(1, 1, t, dtype=torch.bool))[0]
        assert recent <= best + 1e-6 and abs(best - (p[:, :t] * pick).sum(-1).mean().item()) < 1e-5


def test_solution_ex06_2(rec):
    import torch

    from tutorial import lab, solutions
    at99 = solutions.ex06_2(rec)
    at90 = [torch.cat([lab.tokens_for_mass(p).float() / p.shape[-1] for p in ps]).median().item()
            for ps in rec.p]
    assert all(0 < b <= 1 and b >= a for a, b in zip(at90, at99))
    assert at99[0] == max(at99)                        # layer 0 spreads its attention most


def test_solution_ex07_1(lm, rec):
    from tutorial import lab, solutions
    got = solutions.ex07_1(lm[0], rec)
    assert got[10][0] == lab.speculated_recall(lm[0], rec, 10, 0.1)
    assert sum(b for _, b in got.values()) < sum(a for a, _ in got.values())   # two ahead loses


def test_solution_ex07_2(lm):
    from tutorial import solutions
    layer1, rest = solutions.ex07_2(*lm)
    assert 0 < layer1 < rest


def test_solution_ex08_1(lm, rec):
    import torch

    import skew as SK
    from tutorial import solutions
    model = lm[0]
    plain, svd = solutions.ex08_1(model, rec)
    cfg = model.cfg
    with torch.no_grad():
        pre = model.layers[10].attn.wq(rec.inputs(10)).view(-1, cfg.n_heads, cfg.head_dim)
    s2 = torch.linalg.svdvals(SK.group_queries(pre, cfg.n_kv_heads).double()) ** 2          # (Hkv, d)
    assert plain <= svd + 1e-6 and abs(svd - (s2[:, :13].sum(-1) / s2.sum(-1)).mean().item()) < 1e-4


def test_solution_ex08_2(lm, rec):
    from tutorial import solutions
    column, plane = solutions.ex08_2(lm[0], rec)
    assert plane < 1e-4 < 1e-2 < column


def test_solution_ex09_1(lm):
    import infinigen as I
    from tutorial import solutions
    model = lm[0]
    cfg = model.cfg
    whole = cfg.n_layers * 2 * cfg.n_kv_heads * 64 * cfg.head_dim * 4             # 64 slots, float32
    want = tuple(I.make_cache(model, pol, 1, 64).device_bytes(1, 64, 4) / whole
                 for pol in (I.Policy("infinigen"), I.Policy.paper()))
    assert solutions.ex09_1(cfg) == pytest.approx(want)


def test_solution_ex09_2(lm, rec):
    from tutorial import solutions
    none, planes = solutions.ex09_2(lm[0], rec)
    assert planes < 1e-5 and none > 1e-2


def test_solution_ex10_1():
    import torch

    from offload import KVStore
    from tutorial import solutions
    share = [8 / (KVStore(2, 1, 4, 1, d, torch.device("cpu"), dt).row_bytes + 8)
             for d, dt in ((64, torch.float32), (128, torch.float16))]
    assert solutions.ex10_1() == pytest.approx(tuple(share))


def test_solution_ex10_2():
    import math

    import torch

    import skew as SK
    from tutorial import solutions
    s = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for alpha in (0.5, 2.0, math.inf):
        for k in (5, 20):
            every = torch.ones(1, 1, 50, dtype=torch.bool)
            want = SK.threshold_select(s[None], alpha, torch.tensor([k]), every)
            assert torch.equal(solutions.ex10_2(s, alpha, k), want[0])


def test_solution_ex11_1(lm):
    import infinigen as I
    from tutorial import lab, solutions
    model, tok = lm
    _, st = I.generate(model, [lab.text_tokens(tok, 150)], I.Policy("infinigen", layer_budget="uniform"),
                       max_new=7, stop_ids=())
    assert solutions.ex11_1(model, tok) == st["h2d_bytes_per_step"]


def test_solution_ex11_2(lm):
    from tutorial import solutions
    mine, full = solutions.ex11_2(*lm)
    assert mine == full and len(mine) == 8


def test_solution_ex12_1(lm):
    import infinigen as I
    from tutorial import solutions
    prompt, uniform = solutions.ex12_1(*lm)
    sparse = lm[0].cfg.n_layers - I.Policy().dense_layers
    assert uniform == sparse * int(I.Policy().count([200])[0]) and abs(prompt - uniform) < sparse


def test_solution_ex12_2(lm):
    from tutorial import solutions
    planned, took = solutions.ex12_2(*lm)
    n = lm[0].cfg.n_layers
    assert planned == took == list(range(2, n))


def test_solution_ex13_1():
    from tutorial import solutions
    got = solutions.ex13_1()
    assert got["counter"] == [0, 3, 4, 5] and 3 in got["lru"] and 0 not in got["fifo"]


def test_solution_ex13_2(lm):
    import infinigen as I
    from tutorial import lab, solutions
    model, tok = lm
    pol = I.Policy("infinigen", layer_budget="uniform", capacity=100)
    _, st = I.generate(model, [lab.text_tokens(tok, 96)], pol, max_new=6, stop_ids=())
    assert solutions.ex13_2(model.cfg) == st["pool_requests"]


def test_solution_ex14_1():
    from tutorial import solutions
    rows = solutions.ex14_1()
    assert rows and all(f <= b + 0.005 for _, f, b in rows)                 # counts round up
    assert [a for a, f, b in rows if f < b - 0.005] == [a for a, _, _ in rows if a != "inf"]


def test_solution_ex15_1():
    import torch

    import infinigen as I
    import model as M
    from offload import KVStore
    from tutorial import solutions
    cfg = M.Config.from_hf(dict(model_type="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                                max_position_embeddings=4096))
    row = KVStore(2, 1, 4, 1, cfg.head_dim, torch.device("cpu"), torch.float16).row_bytes + 8
    pol = I.Policy("infinigen")
    want = (cfg.n_layers - pol.dense_layers) * 8 * cfg.n_kv_heads * int(pol.count([4096])[0]) * row
    got, ms, offload_ms = solutions.ex15_1()
    assert got == want and ms == pytest.approx(want / 55e9 * 1e3)
    assert offload_ms == pytest.approx(8 * 4096 * cfg.kv_bytes_per_token / 55e9 * 1e3)


def test_solution_ex16_1(lm):
    import torch

    import infinigen as I
    from tutorial import lab, solutions
    model, tok = lm
    cache = I.make_cache(model, I.Policy("streaming", budget=8, layer_budget="uniform"), 1, 21)
    I.prefill(model, cache, torch.tensor([lab.text_tokens(tok, 20)]), torch.ones(1, 20, dtype=torch.bool))
    cache.begin(1)
    sel = cache.select(2, None, None, None)                          # (B, Hkv, S): slots 0..20
    assert all(sel[0, h].nonzero().flatten().tolist() == solutions.ex16_1() for h in range(sel.shape[1]))


def test_solution_ex16_2(lm):
    from tutorial import solutions
    h2o, full = solutions.ex16_2(*lm)
    assert h2o == full and len(full) == 8


def test_solution_ex17_1():
    from tutorial import solutions
    changed, wanted = solutions.ex17_1()
    assert changed == wanted > 0


def test_solution_ex17_2(monkeypatch):
    import torch

    import kernel
    from offload import KVStore
    from tutorial import solutions
    grids = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *a, **k: grids.append((grid[0], k["STEPS"]))
    monkeypatch.setattr(kernel, "gather_rows_kernel", Launch())
    monkeypatch.setattr(kernel, "sm_count", lambda device: 132)                    # an H200's
    idx = torch.zeros(32, 3, 410, dtype=torch.long)
    kernel.gather_rows(torch.zeros(1, 32, 3, 2, 64), idx, idx.bool(), torch.zeros(410, 32, 3, 2, 64))
    row = KVStore(2, 1, 4, 1, 64, torch.device("cpu"), torch.float16).row_bytes
    assert solutions.ex17_2() == (*grids[0], row) == (33, 64, 256)


def test_solution_ex18_1(lm):
    from tutorial import solutions
    one, four = solutions.ex18_1(*lm)
    assert one == four > 1000, (one, four)


def test_solution_ex18_2(lm):
    from tutorial import solutions
    assert solutions.ex18_2(lm[0]) == {"offload": False, "host": False, "pool": False, "h2o": True}


@pytest.mark.parametrize("argv", [["--help"], ["--wirte"], ["tutorial/no-such-chapter.md"]])
def test_the_runner_runs_nothing_on_help_or_a_slip(argv, monkeypatch):
    """`run.py --help` (or a misspelt flag) ran every chapter: the flags were not parsed."""
    monkeypatch.setattr(run, "run_chapter", lambda *a, **kw: pytest.fail("it ran a chapter"))
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == (0 if argv == ["--help"] else 2)
