"""The neural cache and dynamic evaluation (lmtrain/adapt.py): identities, a brute-force reference, the CLI."""

import json
import os

import numpy as np
import pytest

from lmtrain import adapt
from lmtrain.build import model_from_checkpoint
from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import load_config
from lmtrain.data.sources import load_corpus
from lmtrain.evaluation import evaluate
from lmtrain.training import fit
from tests.test_cli import assert_one_line_error, lmtrain


def trained(root, overrides=()):
    """A tiny trained run: (checkpoint path, model in float64, corpus)."""
    from tests.conftest import TINY

    (root / "tiny.yaml").write_text(TINY)
    fit(load_config(root / "tiny.yaml", list(overrides)), str(root / "run"), quiet=True)
    ckpt = root / "run" / "checkpoints" / "best.npz"
    model, _, cfg = model_from_checkpoint(load_checkpoint(ckpt), dtype="float64")
    return ckpt, model, load_corpus(cfg.data, log=lambda *a: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("adapt"))


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    """The same with the adaptive softmax the speedrun preset trains (tied, tails tied too): its scores are
    exact log-probabilities, not logits, and its backward is the adaptive head's and tail's."""
    return trained(
        tmp_path_factory.mktemp("adapt-adaptive"),
        [
            "model.softmax=adaptive",
            "model.adaptive_cutoffs=[8]",
            "model.tie_weights=true",
            "model.adaptive_div=1",
            "model.adaptive_tie_tails=true",
        ],
    )


both_heads = pytest.mark.parametrize("head", ["run", "adaptive_run"])


@both_heads
def test_cache_with_lambda_0_is_plain_evaluation_to_the_bit(head, request):
    _, model, corpus = request.getfixturevalue(head)
    loss, _, count = evaluate(model, corpus.valid, 1, bptt=10)
    r = adapt.run(model, corpus.valid, 10, cache_settings=dict(window=50, theta=0.5, lam=0.0), progress=False)
    assert r["cache"]["loss"] == r["base"]["loss"] == loss and r["base"]["tokens"] == count
    r = adapt.run(model, corpus.valid, 10, cache_settings=dict(window=50, theta=0.5, lam=0.2), progress=False)
    assert r["cache"]["loss"] != loss


@both_heads
def test_dynamic_with_lr_0_is_plain_evaluation_to_the_bit(head, request):
    _, model, corpus = request.getfixturevalue(head)
    ms = np.ones(model.store.data.shape)
    before = model.store.data.copy()
    loss, _, _ = evaluate(model, corpus.valid, 1, bptt=5)
    r = adapt.run(model, corpus.valid, 5, dyn_settings=dict(lr=0.0, decay=0.01), ms=ms, progress=False)
    assert r["dynamic"]["loss"] == loss
    r = adapt.run(model, corpus.valid, 5, dyn_settings=dict(lr=1e-3, decay=0.01), ms=ms, progress=False)
    assert r["dynamic"]["loss"] != loss
    assert np.array_equal(model.store.data, before)  # the trained weights are back afterwards


def test_cache_probabilities_sum_to_1_and_match_a_brute_force_cache():
    rng = np.random.default_rng(0)
    V, d, n, window, theta, lam = 7, 4, 23, 6, 0.7, 0.3
    h, targets = rng.standard_normal((n, d)), rng.integers(0, V, n)
    p_model = rng.dirichlet(np.ones(V), n)
    cache = adapt.NeuralCache(window, theta)
    got_target, got_dist = [], []
    for a in range(0, n, 5):  # windows of 5 rows, as evaluation feeds them
        w, words = cache.weights(h[a : a + 5], targets[a : a + 5])
        got_dist.append(adapt.distribution(w, words, V))
        got_target.append((w * (words[None, :] == targets[a : a + 5, None])).sum(axis=1))
    dist, target = np.concatenate(got_dist), np.concatenate(got_target)
    for t in range(n):  # the definition, position by position
        seen = range(max(0, t - window), t)
        ref = np.zeros(V)
        if seen:
            e = np.exp([theta * h[t] @ h[j] for j in seen])
            for j, ej in zip(seen, e / e.sum()):
                ref[targets[j]] += ej
        np.testing.assert_allclose(dist[t], ref, atol=1e-12)
        assert target[t] == pytest.approx(ref[targets[t]], abs=1e-12)
        mixed = (1 - lam) * p_model[t] + lam * dist[t] if seen else p_model[t]
        assert mixed.sum() == pytest.approx(1.0, abs=1e-12)
        gain = adapt.mixture_gain(target[t : t + 1], np.array([bool(seen)]), np.log(p_model[t, targets[t]]), lam)[0]
        assert np.log(p_model[t, targets[t]]) + gain == pytest.approx(np.log(mixed[targets[t]]), abs=1e-12)


def test_tuned_cache_replays_what_evaluation_computes(run):
    _, model, corpus = run
    grid = dict(window=(20,), theta=(0.5,), lam=(0.1, 0.2))
    rows, base = adapt.tune_cache(model, corpus.valid, 10, grid=grid, progress=False)
    for row in rows:
        r = adapt.run(model, corpus.valid, 10, cache_settings=row, progress=False)
        assert r["cache"]["ppl"] == pytest.approx(row["ppl"], rel=1e-10)
        assert r["base"]["ppl"] == pytest.approx(base, rel=1e-12)


def test_a_grid_edge_grows_by_the_ratio_of_its_outer_values():
    assert adapt.beyond_edge([0.1, 0.2, 0.8, 1.2], 1.2, "theta") == pytest.approx(1.8)
    assert adapt.beyond_edge([0.1, 0.2, 0.8, 1.2], 0.1, "theta") == pytest.approx(0.05)
    assert adapt.beyond_edge([0.1, 0.2, 0.8, 1.2], 0.2, "theta") is None
    assert adapt.beyond_edge([100, 500, 2000], 2000, "window") == 8000
    assert adapt.beyond_edge([0.3, 0.6], 0.6, "lam") == pytest.approx(0.8)  # 1.2 would leave no model
    assert adapt.beyond_edge([0.5], 0.5, "theta") is None  # one value: the axis is fixed
    assert adapt.beyond_edge([0.0, 0.01], 0.01, "decay") == pytest.approx(0.03)  # no ratio to 0: the grids' 3x
    assert adapt.beyond_edge([0.0, 0.01], 0.0, "decay") is None  # nothing below no decay


def test_cache_tuner_grows_the_grid_past_a_winning_edge(run):
    """With two values per axis the best is on an edge of each, so each must grow until the best lies
    inside the values tried, or it has grown ``extend`` times."""
    _, model, corpus = run
    extend = 3
    rows, _ = adapt.tune_cache(
        model,
        corpus.valid,
        10,
        grid=dict(window=(20,), theta=(0.5, 1.0), lam=(0.1, 0.2)),
        extend=extend,
        progress=False,
    )
    best = rows[0]
    assert {r["window"] for r in rows} == {20}
    for axis in ("theta", "lam"):
        tried = sorted({r[axis] for r in rows})
        assert len(tried) > 2
        assert tried[0] < best[axis] < tried[-1] or len(tried) == 2 + extend
    for row in rows[:3]:
        r = adapt.run(model, corpus.valid, 10, cache_settings=row, progress=False)
        assert r["cache"]["ppl"] == pytest.approx(row["ppl"], rel=1e-10)


def test_dynamic_tuner_grows_past_a_winning_edge(run):
    """As the cache's: two rates, so the best is on an edge and the rates must grow until the best lies
    inside those tried, or they have grown ``extend`` times; a decay of 0 is an edge with nothing below."""
    _, model, corpus = run
    extend = 3
    ms = np.random.default_rng(1).uniform(0.5, 2.0, model.store.data.shape)
    rows, _ = adapt.tune_dynamic(
        model, corpus.valid[:300], 5, ms, lrs=(1e-4, 3e-4), decays=(0.0, 0.01), refine=(), extend=extend, progress=False
    )
    best = rows[0]
    lrs, decays = sorted({r["lr"] for r in rows}), sorted({r["decay"] for r in rows})
    assert len(lrs) > 2
    assert lrs[0] < best["lr"] < lrs[-1] or len(lrs) == 2 + extend
    assert decays[0] < best["decay"] < decays[-1] or best["decay"] == 0.0 or len(decays) == 2 + extend
    r = adapt.run(model, corpus.valid[:300], 5, dyn_settings=best, ms=ms, progress=False)
    assert r["dynamic"]["ppl"] == pytest.approx(best["ppl"], rel=1e-10)


@both_heads
def test_dynamic_evaluation_scores_each_segment_before_adapting_to_it(head, request):
    """Two segments by hand: the first scored by the trained weights, the second after one step of the rule
    on the first, with the gradient of the model's own backward."""
    _, model, corpus = request.getfixturevalue(head)
    ids, seg, lr, decay = corpus.valid[:11], 5, 0.05, 0.2
    ms = np.random.default_rng(1).uniform(0.5, 2.0, model.store.data.shape)
    theta0 = model.store.data.copy()
    state, losses = model.init_state(1), []
    for a in (0, seg):
        x, y = ids[a : a + seg, None], ids[a + 1 : a + seg + 1, None]
        out, state = model.forward(x, state)
        losses.append(model.loss(out, y).mean * seg)
        model.backward()
        rms = np.sqrt(ms)
        p = model.store.data
        p -= lr * model.store.grad / (rms + adapt.DYN_EPS)
        p += np.minimum(1.0, decay * rms / rms.mean()) * (theta0 - p)
    model.store.data[...] = theta0
    r = adapt.run(model, ids, seg, dyn_settings=dict(lr=lr, decay=decay), ms=ms, progress=False)
    assert r["dynamic"]["loss"] * 10 == pytest.approx(sum(losses), rel=1e-12)
    assert r["dynamic"]["loss"] != r["base"]["loss"]


def test_a_diverging_setting_ranks_last(run):
    """A step so large that the adapted weights overflow (here an infinite one) scores NaN; the search must
    not pick it, though NaN compares false with everything (tried first, it would have stayed the minimum)."""
    _, model, corpus = run
    ms = np.full(model.store.data.shape, 1e-12)
    with np.errstate(all="ignore"):
        rows, _ = adapt.tune_dynamic(
            model, corpus.valid[:300], 5, ms, lrs=(np.inf, 1e-4), decays=(0.0, 0.01), extend=0, progress=False
        )
    assert rows[-1]["lr"] == np.inf and np.isnan(rows[-1]["ppl"])
    assert np.isfinite(rows[0]["ppl"]) and rows[0]["lr"] in (1e-4, 5e-5, 2e-4)
    # the coordinate search (2 rates, then the other decay at the best rate), then half and twice the best
    # rate, then (unless the best decay is 0) half and twice the best decay at the best rate
    best = rows[0]
    refined = [r for r in rows if r["lr"] == best["lr"] and r["decay"] not in (0.0, 0.01)]
    if best["decay"] == 0:
        assert sorted(r["lr"] for r in rows) == [5e-5, 1e-4, 1e-4, 2e-4, np.inf] and not refined
    else:
        assert sorted(r["lr"] for r in rows) == sorted([5e-5, 1e-4, 1e-4, 2e-4, np.inf, best["lr"], best["lr"]])
        assert sorted(r["decay"] for r in refined) == [0.005, 0.02]


def test_gradient_statistics_are_cached_under_the_checkpoint_checksum(run, monkeypatch):
    ckpt, model, corpus = run
    sha = load_checkpoint(ckpt).sha256
    stale = adapt.stats_path(ckpt, "0" * 64)
    np.savez(stale, ms=np.zeros(3), sha256=np.str_("0" * 64))  # an earlier version of the checkpoint's
    ms = adapt.gradient_stats(model, corpus.train, 10, ckpt, sha, progress=False, echo=lambda *a: None)
    assert ms.shape == model.store.data.shape and (ms > 0).mean() > 0.5
    assert not os.path.exists(stale)
    monkeypatch.setattr(model, "backward", lambda *a: pytest.fail("recomputed despite the cache"))
    assert np.array_equal(adapt.gradient_stats(model, corpus.train, 10, ckpt, sha, progress=False), ms)
    assert adapt.stats_path(ckpt, sha) != adapt.stats_path(ckpt, "f" * 64)  # another checkpoint, another file


def test_eval_prints_base_cache_and_dynamic_side_by_side(run):
    ckpt = run[0]
    out = json.loads(
        lmtrain("eval", "--ckpt", ckpt, "--split", "valid", "--cache", "--dynamic", "--json", check=0).stdout
    )
    assert set(out["results"]) == {"base", "cache", "dynamic", "dynamic+cache"}
    assert out["cache"]["window"] == 500 and out["dynamic"]["lr"] == 3e-4
    for r in out["results"].values():
        assert r["seconds"] >= 0 and r["tokens"] == out["tokens"]
    # base is plain evaluation of the same single stream; each method moves it, and both together again
    plain = json.loads(
        lmtrain("eval", "--ckpt", ckpt, "--split", "valid", "--batch-size", "1", "--json", check=0).stdout
    )
    ppl = {name: r["ppl"] for name, r in out["results"].items()}
    assert ppl["base"] == pytest.approx(plain["ppl"], rel=1e-12)
    assert len({round(p, 9) for p in ppl.values()}) == 4 and min(ppl.values()) < ppl["base"]
    text = lmtrain("eval", "--ckpt", ckpt, "--split", "valid", "--cache", "--cache-lambda", "0", check=0).stdout
    assert "base" in text and "(+0.0%)" in text
    assert_one_line_error(lmtrain("eval", "--ckpt", ckpt, "--cache", "--batch-size", "4"), "--batch-size must be 1")


def test_tune_eval_never_reads_the_test_split(run, tmp_path):
    """The tuner runs in a process where touching the test split raises."""
    ckpt = run[0]
    script = tmp_path / "guarded.py"
    script.write_text("""
import sys
import lmtrain.data.corpus as corpus
class Forbidden:
    def __getattr__(self, name):
        raise SystemExit("the test split was read")
    def __getitem__(self, key):
        raise SystemExit("the test split was read")
    def __len__(self):
        raise SystemExit("the test split was read")
original = corpus.Corpus.__init__
def guarded(self, *args, **kwargs):
    original(self, *args, **kwargs)
    object.__setattr__(self, "test", Forbidden())
corpus.Corpus.__init__ = guarded
from lmtrain.cli import main
main(sys.argv[1:])
""")
    import subprocess
    import sys

    for method in ("cache", "dynamic"):
        proc = subprocess.run(
            [sys.executable, str(script), "tune-eval", "--ckpt", str(ckpt), "--method", method, "--json"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["split"] == "valid" and out["best"]["ppl"] == min(r["ppl"] for r in out["trials"])
        assert "--split test" in out["command"] and f"--{method}" in out["command"]
    # the guard works: plain evaluation of the test split through it fails
    proc = subprocess.run(
        [sys.executable, str(script), "eval", "--ckpt", str(ckpt), "--split", "test"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "the test split was read" in proc.stderr + proc.stdout
