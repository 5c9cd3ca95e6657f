"""The policies' rules checked against hand-written versions of them, one (batch, head) at a time: H2O's
recent window and heavy hitters, its scores as attention mass, the recall measure's head grouping, the
skew calibrated on real tokens only, and sampling's temperature and top-p. Each of these rules once had
a plausible bug (a mutation round) that every test comparing with full attention at budget 1 let pass.
CPU, a random GQA Llama (6 query heads over 2 KV heads, G = 3)."""
import math

import pytest
import torch

import infinigen as IG
import skew as SK
from infinigen import Policy
from test_policies import hf_random, padded


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    m, prompts = hf_random(tmp_path_factory.mktemp("llama"), "llama", 1)
    assert m.cfg.n_kv_heads == 2 and m.cfg.n_heads == 6
    return m, prompts


def run(m, prompts, cache, steps, tokens=(7, 11, 13, 17, 19, 23, 29, 31)):
    """Prefill, then `steps` decode steps fed the given tokens (the same for every sequence)."""
    t, valid = padded(prompts)
    IG.prefill(m, cache, t, valid)
    for i in range(steps):
        IG.decode_one(m, cache, torch.full((len(prompts),), tokens[i % len(tokens)]))


# --- H2O
def h2o_by_hand(score, alive, allowed, k, recent):
    """One (sequence, KV head): the int(k * recent) newest past tokens, then the heaviest alive others
    by accumulated score, k in all. -> the set of kept slots."""
    past = allowed.nonzero().flatten().tolist()                 # slot order is time order
    n_recent = int(k * recent)
    keep = set(past[len(past) - n_recent:]) if n_recent else set()
    others = sorted((t for t in past if t not in keep and alive[t]), key=lambda t: -float(score[t]))
    return keep | set(others[:k - n_recent])


@pytest.mark.parametrize("budget,recent", [(0.3, 0.5), (5, 0.5), (0.5, 0.3), (0.2, 0.0)])
def test_h2o_keeps_the_newest_and_the_heaviest(llama, budget, recent, monkeypatch):
    m, prompts = llama
    cache = IG.make_cache(m, Policy("h2o", budget=budget, recent=recent), len(prompts), 48 + 8)
    seen, select = [], cache.select

    def spy(layer, q, x, rope):
        state = (cache.score[layer].clone(), cache.alive[layer].clone(), cache.allowed.clone(),
                 cache.counts[layer].clone())
        sel = select(layer, q, x, rope)
        seen.append((state, sel.clone()))
        return sel
    monkeypatch.setattr(cache, "select", spy)
    run(m, prompts, cache, 6)
    assert len(seen) == 6 * (m.cfg.n_layers - cache.pol.dense_layers)
    odd = 0
    for (score, alive, allowed, counts), sel in seen:
        for b in range(len(prompts)):
            k = int(counts[b])
            odd += int(k * recent) != math.ceil(k * recent)
            for h in range(m.cfg.n_kv_heads):
                want = h2o_by_hand(score[b, h], alive[b, h], allowed[b, 0], k, recent)
                assert set(sel[b, h].nonzero().flatten().tolist()) == want
    assert odd or recent == 0, "some step should have a recent share that is not a whole number"


def test_h2o_scores_hold_all_the_attention_mass(llama):
    """Each query head's attention sums to 1, so a KV head's accumulated scores sum to G x the queries
    so far in each sparse layer: the prompt's and one per decode step (evicted tokens keep theirs)."""
    m, prompts = llama
    T, G = len(prompts[0]), m.cfg.n_heads // m.cfg.n_kv_heads
    for steps in (0, 3):
        cache = IG.make_cache(m, Policy("h2o", budget=0.3), 1, T + 8)
        run(m, prompts[:1], cache, steps)
        want = torch.full((m.cfg.n_layers, 1, m.cfg.n_kv_heads), float(G * (T + steps)))
        want[:cache.pol.dense_layers] = 0.0                               # dense layers keep everything
        assert torch.allclose(cache.score.sum(-1), want, rtol=1e-5), steps


# --- Recall
def recall_by_hand(cache, layer, q, k, slots, mask):
    """The mean over (sequence, query head) of the full-attention mass on what the query head's KV head
    attended to (its fetched rows, and the new token), from the raw q and keys, one head at a time."""
    t0, G = cache.t0, cache.G
    kall = torch.cat([cache.store.keys(layer, t0, cache.dev).to(q.dtype), k], 2)      # (B, Hkv, t0+1, d)
    total = []
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            kv = h // G
            s = (kall[b, kv] @ q[b, h, 0]).float() * q.shape[-1] ** -0.5
            p = s.masked_fill(~cache.valid[b, :t0 + 1], float("-inf")).softmax(-1)
            chosen = {int(t) for t, ok in zip(slots[b, kv], mask[b, kv, 0]) if ok} | {t0}
            total.append(float(p[sorted(chosen)].sum()))
    return sum(total) / len(total)


@pytest.mark.parametrize("name", ["h2o", "infinigen"])
def test_recall_is_the_mass_each_query_heads_kv_head_fetched(llama, name, monkeypatch):
    m, prompts = llama
    cache = IG.make_cache(m, Policy(name, budget=0.2, measure_recall=True), len(prompts), 48 + 8)
    got, recall_of = [], cache.recall_of

    def spy(layer, q, k, slots, mask):
        r = recall_of(layer, q, k, slots, mask)
        got.append((r, recall_by_hand(cache, layer, q, k, slots, mask)))
        return r
    monkeypatch.setattr(cache, "recall_of", spy)
    run(m, prompts, cache, 4)
    assert len(got) == 4 * (m.cfg.n_layers - cache.pol.dense_layers)
    assert all(r < 0.999 for r, _ in got), "a budget of 0.2 should miss some mass"
    for r, want in got:
        assert r == pytest.approx(want, abs=1e-5)


# --- Calibration
@pytest.mark.parametrize("skew", ["svd", "planes"])
def test_the_skew_is_calibrated_on_real_tokens_only(llama, skew):
    """Left padding holds whatever token ids; the skew of a padded batch must not depend on them."""
    m, prompts = llama
    tokens, valid = padded(prompts)
    assert not valid.all()
    maps = []
    for pad in (0, 57):
        cache = IG.make_cache(m, Policy("infinigen", skew=skew), len(prompts), tokens.shape[1] + 4)
        IG.prefill(m, cache, tokens.masked_fill(~valid, pad), valid)
        maps.append(cache.P)
    for layer, (a, b) in enumerate(zip(*maps)):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5)), layer


# --- Sampling
def draws(logits, temperature, top_p, n=4000):
    gen = torch.Generator().manual_seed(0)
    tok = IG.sample(torch.tensor(logits).expand(n, -1), temperature, top_p, gen)
    return (torch.bincount(tok, minlength=len(logits)).float() / n).tolist()


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    """p = (0.5, 0.3, 0.2), top_p 0.6: the first two (0.8 >= 0.6), renormalized to (0.625, 0.375)."""
    got = draws([math.log(0.5), math.log(0.3), math.log(0.2)], 1.0, 0.6)
    assert got[2] == 0.0 and got[0] == pytest.approx(0.625, abs=0.03)


@pytest.mark.parametrize("temperature,top_p,want", [
    (1.0, 1.0, [0.15, 0.5, 0.05, 0.3]), (1.0, 0.7, [0, 0.625, 0, 0.375]), (1.0, 0.3, [0, 1, 0, 0]),
    (0.0, 1.0, [0, 1, 0, 0])])                                                                     # greedy
def test_sampling_returns_token_ids_not_ranks(temperature, top_p, want):
    """The tokens in no order of probability: a draw is mapped back from its rank to its id."""
    got = draws([math.log(p) for p in (0.15, 0.5, 0.05, 0.3)], temperature, top_p)
    assert got == pytest.approx(want, abs=0.03)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """logits (2, 0): the first token's probability is sigmoid(2 / temperature)."""
    got = draws([2.0, 0.0], temperature, 1.0)
    assert got[0] == pytest.approx(1 / (1 + math.exp(-2 / temperature)), abs=0.02)


# --- InfiniGen's count per head: the authors' rule (--head-count mean, in --paper)
def mean_count_by_hand(s, allowed, alpha, cap):
    """One sequence (Hkv, t): every head counts its allowed tokens within alpha of its best; each then keeps
    its best n allowed, n the heads' mean count rounded down, at most cap (speculate_attention's rule)."""
    counts = []
    for h in range(s.shape[0]):
        vals = [float(s[h, t]) for t in range(s.shape[1]) if allowed[t]]
        counts.append(sum(v >= max(vals) - alpha for v in vals))
    n = min(int(sum(counts) / len(counts)), cap)
    keep = []
    for h in range(s.shape[0]):
        ranked = sorted((t for t in range(s.shape[1]) if allowed[t]), key=lambda t: -float(s[h, t]))
        keep.append(set(ranked[:n]))
    return keep


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
def test_the_authors_count_is_the_heads_mean_for_every_head(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, t = 3, 4, 40
    s = torch.randn(B, Hkv, t, generator=g) * 3
    allowed = torch.rand(B, 1, t, generator=g) < 0.8
    cap = torch.tensor([40, 6, 2])
    got = SK.threshold_select(s, alpha, cap, allowed, kmax=40, mean=True)
    for b in range(B):
        want = mean_count_by_hand(s[b], allowed[b, 0], alpha, int(cap[b]))
        assert [set(got[b, h].nonzero().flatten().tolist()) for h in range(Hkv)] == want, (seed, alpha, b)
    assert torch.equal(SK.threshold_select(s, math.inf, cap, allowed, 40, mean=True),
                       SK.threshold_select(s, math.inf, cap, allowed, 40))     # alpha inf: the cap decides


def test_the_two_counts_differ_where_the_heads_do():
    """Head 0 has 1 token within alpha, head 1 has 9: each keeps its own (1 and 9), or both keep 5."""
    s = torch.full((1, 2, 12), -10.0)
    s[0, 0, 0], s[0, 1, :9] = 0.0, 0.0
    s[0, 0, 1:6] = torch.tensor([-5.0, -6.0, -7.0, -8.0, -9.0])        # head 0's next best, outside alpha 1
    allowed, cap = torch.ones(1, 1, 12, dtype=torch.bool), torch.tensor([12])
    own, mean = (SK.threshold_select(s, 1.0, cap, allowed, 12, m) for m in (False, True))
    assert own.sum(-1).tolist() == [[1, 9]] and mean.sum(-1).tolist() == [[5, 5]]
    assert mean[0, 0, :5].all() and mean[0, 1, :9].sum() == 5


def test_infinigen_selects_by_the_policys_head_count(llama, monkeypatch):
    m, prompts = llama
    seen = []
    real = IG.threshold_slots
    monkeypatch.setattr(IG, "threshold_slots", lambda *a: seen.append(a[-1]) or real(*a))
    for rule in ("own", "mean"):
        pol = Policy("infinigen", budget=0.5, alpha=2.0, head_count=rule)
        run(m, prompts, IG.make_cache(m, pol, 2, 40), 2)
    assert seen and set(seen[:len(seen) // 2]) == {False} and set(seen[len(seen) // 2:]) == {True}
    assert Policy.paper().head_count == "mean" and Policy().head_count == "own"
    with pytest.raises(ValueError, match="unknown head count"):
        Policy("infinigen", head_count="max")
