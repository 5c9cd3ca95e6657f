"""What eval.py's numbers mean, on the CPU: compare's KL, top-1, perplexity, chunks and fetched shares
against the same numbers written out on stand-ins of the engine; windows, passkey prompts and their
scoring; the labels of the study's rows. The device comparison is tests/test_eval_device.py."""
import pytest
import torch

import eval as E
import infinigen as I
import model as M
from helpers import tiny_llama


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
    tok = type("Tok", (), {"encode": lambda self, text, chat=True: [int(w) for w in text.split()]})()
    assert E.windows_of(tok, str(path), 10, 1).tolist() == [list(range(10))]    # exactly one window's tokens
    assert E.windows_of(tok, str(path), 4, 3)[:, 0].tolist() == [0, 3, 6]       # first to last, evenly
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
    answers = iter([["is", "12345"], ["no"], ["no"]])
    monkeypatch.setattr(E.I, "generate", lambda model, prompts, pol, max_new: ([next(answers)], {}))
    trials = {100: [(12345, E.passkey_prompt(tok, 100, d, 12345)) for d in (0.1, 0.5, 0.9)]}
    assert E.passkey(None, tok, I.Policy("full"), [100], trials) == {"100": pytest.approx(1 / 3)}


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
    assert res["ppl"] == pytest.approx(res["ppl_full"], rel=1e-5)


def test_a_perplexity_past_e700_is_refused_not_a_traceback(monkeypatch):
    full = torch.zeros(4, 3).log_softmax(-1)
    pol = torch.tensor([[0.0, -2000.0, -2000.0]]).log_softmax(-1).expand(4, 3)    # the target: p = e^-2000
    _stand_ins(monkeypatch, full, pol, 2)
    with pytest.raises(ValueError, match="passes e\\^700"):
        E.compare(_Model(), torch.tensor([[0, 1, 1, 1, 1, 1]]), I.Policy("full"), prefix=2, progress=False)
