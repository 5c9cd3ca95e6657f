"""What eval.py's numbers mean, on the CPU: compare's KL, top-1, perplexity, chunks and fetched shares
against the same numbers written out on stand-ins of the engine; windows, passkey prompts and their
scoring; the labels of the study's rows. The device comparison is tests/test_eval_device.py."""
import json
import os

import pytest
import torch

import eval as E
import infinigen as I
import model as M
from helpers import randomize, tiny_llama


# --- compare's arithmetic and the passkey scoring, on stand-ins (CPU, no model): what each number means
class _Cfg:
    n_layers = 3


class _Model(torch.nn.Linear):
    def __init__(self):
        super().__init__(1, 1)
        self.cfg = _Cfg()


def _stand_ins(monkeypatch, full, pol, prefix):
    """compare() on stand-ins of the engine: full attention's log-probabilities `full` (positions prefix..),
    the policy's `pol` (row i: decode step i); returns the list of what was fed (the prefix, then tokens)."""
    fed = []
    monkeypatch.setattr(E, "full_logprobs", lambda model, w, start: full[None] if start == prefix else None)
    monkeypatch.setattr(E.I, "make_cache", lambda *a, **kw: object())
    monkeypatch.setattr(E.I, "prefill", lambda model, cache, toks, valid: fed.append(toks.tolist()))
    step = lambda model, cache, t: fed.append(int(t)) or pol[len(fed) - 2][None]     # (1, V): step i's
    monkeypatch.setattr(E.I, "decode_one", step)
    monkeypatch.setattr(E.I, "stats_of", lambda *a: {"fetched_fraction_per_layer": [1.0, 0.5, 0.25]})
    return fed


def test_compare_scores_the_next_token_against_full_attention(monkeypatch):
    """Fixed log-probabilities for full attention and the policy: NLL of the *next* token, top-1 = agreement
    with full attention (not with the target), KL(full || policy), perplexity = exp(mean NLL), chunks
    starting at the first scored target, sparse_fraction over the sparse layers only."""
    N, prefix, V = 7, 2, 5
    win = torch.tensor([[0, 1, 2, 3, 4, 0, 1]])
    g = torch.Generator().manual_seed(3)
    full = torch.randn(N - prefix, V, generator=g).mul(2).log_softmax(-1)       # positions prefix..N-1
    pol = torch.randn(N - prefix, V, generator=g).mul(2).log_softmax(-1)
    fed = _stand_ins(monkeypatch, full, pol, prefix)
    policy = I.Policy("infinigen", dense_layers=1)
    res = E.compare(_Model(), win, policy, prefix=prefix, chunk=2, progress=False)
    assert fed == [[[0, 1]], 2, 3, 4, 0]                       # the dense prefix, then each true token
    n = N - 1 - prefix
    tgt = win[0, prefix + 1:]
    nll = -pol[torch.arange(n), tgt]
    nll_full = -full[torch.arange(n), tgt]
    kl = (full.exp() * (full - pol)).sum(-1)[:n]
    assert res["positions"] == n
    assert res["ppl"] == pytest.approx(torch.exp(nll.mean()).item(), rel=1e-5)
    assert res["ppl_full"] == pytest.approx(torch.exp(nll_full.mean()).item(), rel=1e-5)
    assert res["top1"] == pytest.approx((pol[:n].argmax(-1) == full[:n].argmax(-1)).float().mean().item())
    assert res["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert [c["start"] for c in res["chunks"]] == [prefix + 1, prefix + 3]
    assert res["chunks"][0]["kl"] == pytest.approx(kl[:2].mean().item(), rel=1e-5)
    assert res["chunks"][1]["ppl"] == pytest.approx(torch.exp(nll[2:].mean()).item(), rel=1e-5)
    assert res["chunks"][1]["ppl_full"] == pytest.approx(torch.exp(nll_full[2:].mean()).item(), rel=1e-5)
    assert res["fetched_fraction"] == pytest.approx(1.75 / 3)
    assert res["sparse_fraction"] == pytest.approx(0.375)                 # layers 1 and 2: one dense layer


class _WordTok:                       # a word per token; its ids are the words themselves
    def encode(self, text, chat=True):
        return text.split()

    def decode(self, ids):
        return " ".join(ids) + " "


def test_windows_are_evenly_spaced_and_a_text_of_one_window_is_enough(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(" ".join(str(i) for i in range(10)))
    chat = lambda self, text, chat=True: [99] * chat + [int(w) for w in text.split()]   # 99: a chat mark
    tok = type("Tok", (), {"encode": chat})()
    assert E.windows_of(tok, str(path), 10, 1).tolist() == [list(range(10))]    # the bare text: no chat marks
    assert E.windows_of(tok, str(path), 4, 3)[:, 0].tolist() == [0, 3, 6]       # first to last, evenly
    assert E.windows_of(tok, str(path), 4, 5)[:, 0].tolist() == [0, 2, 3, 4, 6]  # 1.5 apart, rounded
    assert E.windows_of(tok, str(path), 4, 7).shape == (7, 4)                   # every different window
    with pytest.raises(ValueError, match="different windows"):
        E.windows_of(tok, str(path), 4, 8)


def test_passkey_depth_too_short_contexts_and_hits(monkeypatch):
    tok = _WordTok()
    for depth in (0.1, 0.5, 0.9):                                 # the key sits at `depth` of the filler
        ids = E.passkey_prompt(tok, 400, depth, 12345)
        at = ids.index("12345.") / len(ids)
        assert abs(at - depth) < 0.1, (depth, at)
    with pytest.raises(ValueError, match="too short for the passkey prompt"):
        E.passkey_trials(tok, [25])                                # the prompt fits, the answer does not
    trials = E.passkey_trials(tok, [400, 200])
    assert list(trials) == [400, 200] and all(len(t) == 3 for t in trials.values())
    for n, tries in trials.items():                   # filler up to the context, room left for the answer
        assert all(n - 16 - 10 <= len(ids) and len(ids) + E.ANSWER <= n for _, ids in tries), n
        assert len({key for key, _ in tries}) == 3                          # a key of its own per depth
    answers, pols = iter([["is", "12345"], ["1234"], ["no"]]), []           # "1234": a part of the key
    step = lambda model, prompts, pol, max_new: pols.append(pol) or ([next(answers)], {})
    monkeypatch.setattr(E.I, "generate", step)
    trials = {100: [(12345, E.passkey_prompt(tok, 100, d, 12345)) for d in (0.1, 0.5, 0.9)]}
    pol = I.Policy("h2o", budget=0.3)
    assert E.passkey(None, tok, pol, [100], trials) == {"100": pytest.approx(1 / 3)}
    assert pols == [pol] * 3


def test_a_label_says_paper_at_any_budget():
    p = dict(I.PAPER, name="infinigen", budget=0.1)
    assert E.label(p) == "infinigen svd (paper)" and E.label(dict(p, alpha=5.0)) == "infinigen svd"


def test_full_attention_scores_as_its_own_reference(tmp_path):
    """Policy full against full attention, on a tiny random model: the same distribution at every decoded
    position (KL 0, top-1 1, the same perplexity): the prefix is prefilled whole and each decoded position
    lines up with the reference's."""
    folder = tiny_llama(tmp_path / "m", 64, peaky=True)
    model, _ = M.load_with_tokenizer(folder, torch.device("cpu"), torch.float32)
    win = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    res = E.compare(model, win, I.Policy("full"), prefix=24, progress=False)
    assert res["positions"] == 15 and res["kl"] < 1e-5 and res["top1"] == 1.0, res
    assert res["fetched_per_layer"] == [1.0, 1.0] and res["fetched_fraction"] == res["sparse_fraction"] == 1.0
    assert res["ppl"] == pytest.approx(res["ppl_full"], rel=1e-5)


def test_a_perplexity_past_e700_is_refused_not_a_traceback(monkeypatch):
    full = torch.zeros(4, 3).log_softmax(-1)
    pol = torch.tensor([[0.0, -2000.0, -2000.0]]).log_softmax(-1).expand(4, 3)    # the target: p = e^-2000
    _stand_ins(monkeypatch, full, pol, 2)
    with pytest.raises(ValueError, match="passes e\\^700"):
        E.compare(_Model(), torch.tensor([[0, 1, 1, 1, 1, 1]]), I.Policy("full"), prefix=2, progress=False)


# --- Over 512 tokens and over several windows, on a tiny random model
def _tiny(layers=3, context=1100):
    cfg = M.Config(arch="llama", vocab_size=40, dim=32, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=48,
                   max_seq_len=context)
    torch.manual_seed(0)
    return randomize(M.Transformer(cfg), 0).eval()


def test_full_logprobs_equal_one_forward_past_512_tokens():
    """full_logprobs prefills in pieces of 512 into one cache: the same log-probabilities as one uncached
    forward of the whole window, from a start before the first piece's end and from one after it."""
    model = _tiny(layers=2)
    win = torch.randint(0, 40, (2, 1100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(win).float().log_softmax(-1)                                     # (2, N, V)
    for start in (100, 700):
        got = E.full_logprobs(model, win, start)
        assert got.shape == (2, 1100 - start, 40)
        assert torch.allclose(got, want[:, start:], atol=1e-4), (got - want[:, start:]).abs().max()


def _decode_misses(model, win, pol, prefix):
    """The pool's misses and requests over the decode steps of one window (N,), by hand."""
    cache = I.make_cache(model, pol, 1, len(win))
    I.prefill(model, cache, win[None, :prefix], torch.ones(1, prefix, dtype=torch.bool))
    pool = cache.store.pool
    m0, r0 = pool.misses, pool.requests
    for t in range(prefix, len(win) - 1):
        I.decode_one(model, cache, win[None, t])
    return pool.misses - m0, pool.requests - r0


def test_several_windows_pool_their_positions():
    """Two windows at once are their positions pooled: perplexities from the mean NLL over both, KL and
    top-1 their means, fetched shares the mean of each window's, chunks over the same positions of both
    windows, and the pool's miss rate over the decode steps of both (the prefill's misses left out)."""
    model = _tiny()
    win = torch.randint(0, 40, (2, 48), generator=torch.Generator().manual_seed(1))
    pol = I.Policy("infinigen", budget=0.3, dense_layers=1, capacity=0.5, eviction="fifo")   # 24 tokens
    both = E.compare(model, win, pol, prefix=20, chunk=9, progress=False)
    one = [E.compare(model, win[w:w + 1], pol, prefix=20, chunk=9, progress=False) for w in range(2)]
    mean = lambda k: (one[0][k] + one[1][k]) / 2
    geo = lambda a, b: (a * b) ** 0.5                       # exp of the mean of two logs, same positions each
    assert both["positions"] == 2 * one[0]["positions"] == 2 * 27
    for k in ("ppl", "ppl_full"):
        assert both[k] == pytest.approx(geo(one[0][k], one[1][k]), rel=1e-5)
    for k in ("kl", "top1", "fetched_fraction", "sparse_fraction"):
        assert both[k] == pytest.approx(mean(k), rel=1e-5, abs=1e-7)
    assert both["fetched_per_layer"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(one[0]["fetched_per_layer"], one[1]["fetched_per_layer"])], abs=1e-4)
    for c, (a, b) in zip(both["chunks"], zip(one[0]["chunks"], one[1]["chunks"])):
        assert c["start"] == a["start"] and c["ppl"] == pytest.approx(geo(a["ppl"], b["ppl"]), rel=1e-5)
        assert c["ppl_full"] == pytest.approx(geo(a["ppl_full"], b["ppl_full"]), rel=1e-5)
        assert c["kl"] == pytest.approx((a["kl"] + b["kl"]) / 2, rel=1e-5, abs=1e-7)
    counts = [_decode_misses(model, win[w], pol, 20) for w in range(2)]
    assert all(m > 0 for m, _ in counts), counts
    assert one[0]["pool_miss_rate"] == pytest.approx(counts[0][0] / counts[0][1])
    assert both["pool_miss_rate"] == pytest.approx(sum(m for m, _ in counts) / sum(r for _, r in counts))


# --- The study: which policies each part runs, and what its files say
def test_the_study_runs_each_part_with_its_policies(tmp_path, monkeypatch):
    """make eval's parts, with compare and passkey stood in for: the budgets, rules and evictions each part
    compares, the passkey's three policies, and the run's settings in every file it writes."""
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(E, "HERE", str(tmp_path))
    monkeypatch.setattr(E, "windows_of", lambda tok, path, n, count: torch.zeros(count, n, dtype=torch.long))
    seen = []

    def compare(model, win, pol, prefix):
        seen.append((pol, win.shape, prefix))
        return {"kl": 0.0, "top1": 1.0, "sparse_fraction": 1.0}
    monkeypatch.setattr(E, "compare", compare)
    asked = []
    monkeypatch.setattr(E, "passkey",
                        lambda model, tok, pol, contexts, trials: asked.append(pol) or {"64": 1.0})
    args = E.build_parser().parse_args(["--study", "--text", "dir/t.txt", "--context", "96", "--decode", "24",
                                        "--windows", "3"])
    args.contexts, args.trials = [64], None
    written = E.study(None, None, args)["results"]
    assert [os.path.basename(p) for p in written] == [f"eval-{p}.json" for p in E.PARTS]
    assert all(shape == (3, 96) and prefix == 96 - 24 for _, shape, prefix in seen)
    by = lambda part: json.loads((tmp_path / "results" / f"eval-{part}.json").read_text())
    pols = {part: [r["policy"] for r in by(part)["rows"]] for part in E.PARTS}
    kind = lambda p: (p["name"], p["budget"], p.get("skew"), p.get("layer_budget"))
    assert [kind(p) for p in pols["policies"]] == [
        (n, b, "planes", "prompt") for b in (0.05, 0.1, 0.2) for n in ("infinigen", "h2o", "oracle")] + [
        ("streaming", 0.1, "planes", "prompt"), ("infinigen", 0.1, "svd", "prompt"),
        ("infinigen", 0.1, "none", "prompt")]
    assert [kind(p) for p in pols["layers"]] == [
        (n, b, "planes", "uniform") for b in (0.1, 0.2) for n in ("infinigen", "h2o", "oracle")]
    assert [(p["eviction"], p["capacity"], p["budget"]) for p in pols["pool"]] == [
        (e, 0.8, 0.1) for e in ("fifo", "lru", "counter")]
    assert [p["alpha"] for p in pols["alpha"]] == [2.0, 5.0, 8.0, "inf"]
    assert [p["partial_ratio"] for p in pols["ratio"]] == [0.125, 0.3, 0.5, 0.75, 1.0]
    assert [(E.label(p), p["budget"]) for p in pols["paper"]] == [
        ("infinigen svd (paper)", 0.1), ("infinigen planes", 0.1), ("infinigen svd (paper)", 0.2),
        ("infinigen planes", 0.2)]
    assert [(p["name"], p.get("budget")) for p in pols["passkey"]] == [
        ("full", None), ("infinigen", 0.1), ("h2o", 0.1)]
    assert [(p.name, p.budget) for p in asked] == [("full", 0.2), ("infinigen", 0.1), ("h2o", 0.1)]
    args.only = "pool,passkey"                                    # passkey named: it runs
    assert [os.path.basename(p) for p in E.study(None, None, args)["results"]] == [
        "eval-pool.json", "eval-passkey.json"]
    for part in E.PARTS:
        meta = by(part)
        assert (meta["model"], meta["text"], meta["context"], meta["windows"], meta["decode"]) == (
            "default", "t.txt", 96, 3, 24), part
    monkeypatch.setattr(E, "windows_of", lambda *a: pytest.fail("the passkey part reads no text"))
    args = E.parse(["--study", "--only", "passkey"])              # no --text: the passkey makes its prompts
    E.check_only(args)
    args.contexts, args.trials = [64], None
    assert [os.path.basename(p) for p in E.study(None, None, args)["results"]] == ["eval-passkey.json"]
    assert by("passkey")["text"] is None


def test_the_report_writes_the_table_the_files_hold(tmp_path, monkeypatch):
    """report() on three hand-made parts from two runs: the README between its markers, every column of
    every row, the pool's miss rate, the positions scored, each run's command, the passkey table."""
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(E, "HERE", str(tmp_path))
    (tmp_path / "README.md").write_text("before\n<!-- eval:begin -->\nold\n<!-- eval:end -->\nafter\n")
    meta = {"model": "default", "text": "t.txt", "context": 96, "windows": 2, "decode": 24}
    pol = {"name": "infinigen", "budget": 0.1, "alpha": "inf", "partial_ratio": 0.5, "skew": "planes",
           "layer_budget": "prompt"}
    row = {"kl": 0.01234, "top1": 0.9512, "ppl": 10.123, "ppl_full": 9.876, "fetched_fraction": 0.2345,
           "sparse_fraction": 0.1234, "chunks": [{"start": 73, "ppl": 10.1, "ppl_full": 9.9, "kl": 0.01}]}
    parts = {"policies": ("", [dict(row, policy=pol)]),
             "pool": (" --only pool", [dict(row, policy=dict(pol, capacity=0.8, eviction="fifo"), kl=0.5,
                                            pool_miss_rate=0.0213)]),
             "passkey": (" --only passkey", [
                 {"policy": {"name": "full"}, "accuracy": {"64": 1.0, "128": 0.6667}},
                 {"policy": dict(pol, name="h2o"), "accuracy": {"64": 1 / 3, "128": 0}}])}
    for part, (only, rows) in parts.items():
        run = {"command": "python eval.py --study" + only, "date": "2026-11-0" + ("1" if not only else "2")}
        (tmp_path / "results" / f"eval-{part}.json").write_text(json.dumps(meta | run | {"rows": rows}))
    got = E.report()
    assert got["parts"] == ["policies", "pool", "passkey"] and got["readme"] == str(tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == """before
<!-- eval:begin -->
Default model, `t.txt`, 2 window(s) of 96 tokens, the last 24 left to the policy (23 positions scored); \
made by `python eval.py --study` on 2026-11-01 (policies); \
`python eval.py --study --only pool` on 2026-11-02 (pool); \
`python eval.py --study --only passkey` on 2026-11-02 (passkey).

| part | policy | budget | settings | KL(full‖policy) | top-1 | ppl / full | fetched (all layers) | \
fetched (sparse layers) |
|---|---|---|---|---|---|---|---|---|
| policies | infinigen planes | 0.1 | α=inf, r=0.5, layers: prompt | 0.0123 | 0.951 | 10.12 / 9.88 | 0.234 | \
0.123 |
| pool | infinigen planes | 0.1 | α=inf, r=0.5, pool 80% fifo (2.13% of rows missed), layers: prompt | \
0.5000 | 0.951 | 10.12 / 9.88 | 0.234 | 0.123 |

Passkey retrieval (accuracy over depths 10%, 50%, 90%):

| policy | 64 | 128 |
|---|---|---|
| full | 1.00 | 0.67 |
| h2o 0.1 | 0.33 | 0.00 |
<!-- eval:end -->
after
"""
    for part in ("pool", "passkey"):                                 # one run: its command, no parts named
        os.remove(tmp_path / "results" / f"eval-{part}.json")
    E.report()
    assert "made by `python eval.py --study` on 2026-11-01.\n" in (tmp_path / "README.md").read_text()


def test_a_study_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """The results file of a part is written after each of its rows: a Ctrl-C in the third keeps two."""
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(E, "HERE", str(tmp_path))
    monkeypatch.setattr(E, "windows_of", lambda tok, path, n, count: torch.zeros(count, n, dtype=torch.long))
    calls = []

    def compare(model, win, pol, prefix):
        calls.append(pol)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"kl": 0.0, "top1": 1.0, "sparse_fraction": 1.0}
    monkeypatch.setattr(E, "compare", compare)
    args = E.build_parser().parse_args(["--study", "--only", "pool", "--text", "t.txt"])
    with pytest.raises(KeyboardInterrupt):
        E.study(None, None, args)
    rows = json.loads((tmp_path / "results" / "eval-pool.json").read_text())["rows"]
    assert [r["policy"]["eviction"] for r in rows] == ["fifo", "lru"]


def test_every_policy_flag_reaches_the_policy():
    args = E.build_parser().parse_args([
        "--policy", "h2o", "--budget", "64", "--alpha", "3", "--partial-ratio", "0.25", "--skew", "svd",
        "--dense-layers", "3", "--cpu-kv-capacity", "0.5", "--eviction", "lru", "--layer-budget", "uniform"])
    p = E.policy_from(args)
    assert (p.name, p.budget, p.alpha, p.partial_ratio, p.skew, p.dense_layers, p.capacity, p.eviction,
            p.layer_budget) == ("h2o", 64, 3.0, 0.25, "svd", 3, 0.5, "lru", "uniform")
    assert E.policy_from(args, budget=0.1).budget == 0.1
