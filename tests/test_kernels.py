"""The fast path (lmtrain/fast/: the fused kernels, numba) against the numpy reference it stands in for.

Each kernel is run through the layer that calls it, once on each path, on the same inputs: float64
agrees to rounding (1e-12), float32 to a few units in the last place.  The whole-model checks (the
gradient checks of test_gradients.py, which run on both paths, and the 200-step loss curves here) show
the paths train alike.  Skipped where numba is missing (CI installs it: LMTRAIN_REQUIRE lists numba).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, optional
from tests.test_cli import lmtrain
from tests.test_train import store_of

optional("numba", "pip install -e '.[fast]'")
from lmtrain.fast import StepProducts  # noqa: E402
from lmtrain.fast import kernels as fused  # noqa: E402


def ulps(a, ref):
    """|a - ref| in units of the last place of a float32 ``a`` (ref in float64)."""
    return np.abs(a.astype(np.float64) - ref) / np.spacing(np.abs(a)).astype(np.float64)


@fused.njit
def tanh32_all(x, out):
    for i in range(len(x)):
        out[i] = fused.tanh32(x[i])


@fused.njit
def exp32_all(x, out):
    for i in range(len(x)):
        out[i] = fused.exp32(x[i])


def test_tanh32_and_exp32_are_as_accurate_as_numpy():
    x = np.linspace(-12, 12, 400_001, dtype=np.float32)
    x = np.concatenate([x, np.float32([0, -0.0, 1e-30, 1e-8, -1e-8, 9, 50])])
    out = np.empty_like(x)
    tanh32_all(x, out)
    ref = np.tanh(x.astype(np.float64))
    assert np.abs(out).max() <= 1
    assert ulps(out, ref).max() <= 6 and ulps(out, ref).mean() <= 1.5
    assert out[-1] == 1 and out[-7] == 0 and out[-4] == np.float32(1e-8) and out[-3] == np.float32(-1e-8)

    x = np.linspace(-87, 88, 400_001, dtype=np.float32)
    exp32_all(x, out := np.empty_like(x))
    ref = np.exp(x.astype(np.float64))
    assert ulps(out, ref).max() <= 4 and ulps(out, ref).mean() <= 1


def both_paths(on_path, run):
    """run(path) on the numpy reference and on the fast path (lmtrain.build.Path): the two results."""
    numpy_path, numba_path = on_path("numpy"), on_path("numba")
    assert (numpy_path.name, numba_path.name) == ("numpy", "numba")
    return run(numpy_path), run(numba_path)


def assert_same(a, b, dtype):
    """Equal to rounding: 1e-12 in float64; in float32 a few ulps of the largest value."""
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if dtype == np.float64:
            np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-12 * np.abs(x).max())
        else:
            np.testing.assert_allclose(y, x, rtol=2e-5, atol=2e-6 * np.abs(x).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("B", [3, 6, 21])
def test_cells_agree_with_numpy(on_path, cell, dtype, B):
    """A window forward and backward through a Recurrent layer, with a carried-in state and a gradient at
    the final state: outputs, final state, every parameter gradient and the input and state gradients.
    At B = 3 the step products go through the step kernel's single rows, at 6 through its blocks of four
    rows too, at 21 to BLAS (StepProducts.ROWS)."""
    cells_agree(on_path, cell, dtype, B, H=6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lstm_window_kernel_splits_large_steps_over_threads(on_path, dtype):
    """From B x H = PARALLEL_CELL units a step the LSTM's window kernels split the cell's rows over the
    threads: the same results as the numpy path."""
    B, H = 16, 512
    assert B * H >= fused.PARALLEL_CELL and B in StepProducts.ROWS
    cells_agree(on_path, "lstm", dtype, B, H, T=4)


def cells_agree(on_path, cell, dtype, B, H, T=7):
    rng = np.random.default_rng(5)
    D = 5
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    a = 0.6 * min(1.0, np.sqrt(6 / H))  # pre-activations of the same size at any H: float32's rounding stays small
    weights = [rng.uniform(-a, a, s).astype(dtype) for s in [(D, G * H), (H, G * H), (G * H,)]]
    bias_h = rng.uniform(-0.5, 0.5, H).astype(dtype)
    nstate = 2 if cell == "lstm" else 1
    x = rng.standard_normal((T, B, D)).astype(dtype) * 2
    state = [rng.standard_normal((B, H)).astype(dtype) for _ in range(nstate)]
    dh = rng.standard_normal((T, B, H)).astype(dtype)
    dfinal = [rng.standard_normal((B, H)).astype(dtype) for _ in range(nstate)]

    def run(path):
        layer = path.layers.Recurrent(*(w.copy() for w in weights), cell=cell)
        if cell == "gru":
            layer.params["bias_h"][...] = bias_h
        h, final = layer.forward(x.copy(), [s.copy() for s in state], train=True)
        out = [h.copy(), *final]
        dx, dstate = layer.backward(dh.copy(), [d.copy() for d in dfinal])
        return out + [dx, *dstate] + [g.copy() for g in layer.grads.values()]

    a, b = both_paths(on_path, run)
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    assert_same(a, b, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B, K, N", [(1, 16, 7), (3, 5, 2), (4, 33, 1), (6, 48, 11), (20, 656, 2600), (20, 2600, 650)])
def test_step_product_kernel_agrees_with_blas(dtype, B, K, N):
    """fused.matmul_t against numpy's product: blocks of four rows and three columns, the rows and columns
    left over, odd and tiny sizes; float64 to rounding, float32 to its reordered sums."""
    rng = np.random.default_rng(8)
    x, wt = rng.standard_normal((B, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
    out = np.full((B, N), np.nan, dtype)
    fused.matmul_t(x, wt, out)
    ref = x.astype(np.float64) @ wt.T.astype(np.float64)
    rtol = 1e-13 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.sqrt(K) * 4)
    x[B // 2, K // 2] = np.nan  # no nnan in its fast-math flags: a NaN reaches its row of the result
    fused.matmul_t(x, wt, out)
    assert np.isnan(out[B // 2]).all() and np.isfinite(np.delete(out, B // 2, axis=0)).all()


def test_step_products_choose_the_kernel_by_batch():
    """StepProducts: the kernel for 2-20 rows and windows of MIN_STEPS steps or more, BLAS otherwise (the
    numpy reference has no StepProducts: its steps' products are BLAS's); h W_h (through the transposed,
    zero-padded copy) and d W_h^T agree with numpy's either way."""
    rng = np.random.default_rng(9)
    H, G = 37, 4
    Wh = rng.standard_normal((H, G * H))
    w = np.zeros((G * H + 5, H + 3))[:-5, 1:-2]  # a strided view: transpose_into writes through it
    fused.transpose_into(Wh, w)
    assert (w == Wh.T).all()
    for B, T, kernel in [(20, 4, True), (2, 35, True), (21, 35, False), (1, 35, False), (20, 3, False)]:
        steps = StepProducts()
        steps.load(Wh, B, T)
        assert (steps.kernel is not None) == kernel
        h, d = rng.standard_normal((B, H)), rng.standard_normal((B, G * H))
        np.testing.assert_allclose(steps.times(h, np.empty((B, G * H))), h @ Wh, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(steps.times_t(d, steps.out_t(B, d.dtype)), d @ Wh.T, rtol=1e-12, atol=1e-12)
        steps.load(2 * Wh, B, T)  # the next window's weights replace the copy
        np.testing.assert_allclose(steps.times(h, np.empty((B, G * H))), h @ (2 * Wh), rtol=1e-12, atol=1e-12)


def test_evaluation_reuses_the_transposed_weights_only_while_they_are_held(on_path):
    """While the weights are held (an evaluation's windows) a window keeps the previous window's W_h^T, and
    each forward equals a new layer's (which transposes afresh) after the weights change in place between two
    holds, after a training window with DropConnect (whose copy holds the masked W_h) and after a training
    window alone."""
    layers = on_path("numba").layers
    rng = np.random.default_rng(12)
    T, B, H = 6, 4, 21
    Wx, Wh, b = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in [(H, 4 * H), (H, 4 * H), (4 * H,)])
    layer = layers.Recurrent(Wx, Wh, b, weight_drop=0.5, rng=np.random.default_rng(0))
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    state = tuple(np.zeros((B, H), np.float32) for _ in range(2))

    calls = []

    def evaluate_and_check(held=True):
        """Whether the layer transposed W_h for this window."""
        layer.hold_weights(held)
        before = len(calls)
        out = layer.forward(x, state, train=False)[0].copy()
        transposed = len(calls) > before
        fresh = layers.Recurrent(Wx.copy(), Wh.copy(), b.copy()).forward(x, state, train=False)[0]
        assert np.array_equal(out, fresh)
        return transposed

    transpose = fused.transpose_into
    try:
        fused.transpose_into = lambda w, out: (calls.append(1), transpose(w, out))
        assert evaluate_and_check() and not evaluate_and_check()  # the second window reuses the copy
        layer.hold_weights(False)
        Wh[H - 1, 4 * H - 1] += 0.25  # the last weight: the copy must not survive the change
        assert evaluate_and_check() and not evaluate_and_check()
        layer.hold_weights(False)
        layer.forward(x, state, train=True)  # transposes W_h with its DropConnect mask
        assert evaluate_and_check()
        layer.hold_weights(False)
        layer.weight_drop = 0.0
        layer.forward(x, state, train=True)
        assert evaluate_and_check(held=False)
    finally:
        fused.transpose_into = transpose


def test_holding_the_weights_never_keeps_a_training_windows_transpose(on_path):
    """A hold keeps the transpose from one evaluation window to the next, never from or for a training window,
    and a copy made before the hold is not reused inside it."""
    layers = on_path("numba").layers
    rng = np.random.default_rng(13)
    T, B, H = 6, 4, 21
    Wx, Wh, b = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in [(H, 4 * H), (H, 4 * H), (4 * H,)])
    layer = layers.Recurrent(Wx, Wh, b)
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    state = tuple(np.zeros((B, H), np.float32) for _ in range(2))
    calls = []
    transpose = fused.transpose_into
    try:
        fused.transpose_into = lambda w, out: (calls.append("transpose"), transpose(w, out))
        layer.forward(x, state, train=False)  # not held: laid out for this window only
        layer.hold_weights(True)
        first = layer.forward(x, state, train=False)[0].copy()  # the copy from before the hold is not reused
        assert calls == ["transpose", "transpose"]
        again = layer.forward(x, state, train=False)[0]
        assert calls == ["transpose", "transpose"] and np.array_equal(first, again)
        layer.forward(x, state, train=True)
        assert calls == ["transpose"] * 3
        layer.forward(x, state, train=False)  # training's copy is not the held one
        assert calls == ["transpose"] * 4
    finally:
        fused.transpose_into = transpose


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_cross_entropy_agrees_with_numpy(on_path, dtype, weighted):
    """Loss and gradient; rows whose logits would overflow exp (numpy redoes those) and rows far below
    zero included, and enough rows that the work is split over threads."""
    rng = np.random.default_rng(6)
    N, V = 90, 3000
    logits = (rng.standard_normal((N, V)) * 3).astype(dtype)
    logits[0] += 200
    logits[1] -= 300
    logits[2, 17] = 95
    logits[3:6] += np.array([-30.0, -60.0, 58.0], dtype)[:, None]  # either side of the kernels' bounds
    targets = rng.integers(0, V, N)
    weights = (rng.random(N) < 0.8).astype(dtype) if weighted else None

    def run(path):
        layer = path.layers.SoftmaxCrossEntropy()
        mean, total, count = layer.forward(logits.copy(), targets, weights)
        return [np.array([mean, total, count]), layer.backward().copy()]

    a, b = both_paths(on_path, run)
    assert_same(a, b, dtype)
    assert np.isfinite(b[1]).all()
    # evaluation's loss (no gradient kept) is training's to the bit: dynamic evaluation relies on it
    layer = on_path("numba").layers.SoftmaxCrossEntropy()
    assert layer.forward(logits, targets, weights, grad=False) == layer.forward(logits, targets, weights)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_gradient_agrees_with_numpy(on_path, dtype):
    """Repeated words summed, the rows the tied decoder wrote first kept (``rows_written``), embedding
    dropout's scale applied."""
    rng = np.random.default_rng(10)
    V, E = 50, 24
    weight = rng.standard_normal((V, E)).astype(dtype)
    ids = rng.integers(0, 20, (7, 5))  # few distinct words: many repeats
    dout = rng.standard_normal((7, 5, E)).astype(dtype)
    decoder_rows = rng.standard_normal((10, E)).astype(dtype)

    def run(path):
        layer = path.layers.Embedding(weight.copy(), word_drop=0.3, rng=np.random.default_rng(0))
        layer.rows_written = 10
        layer.grads["weight"][:10] = decoder_rows
        layer.forward(ids, train=True)
        layer.backward(dout.copy())
        return [layer.grads["weight"].copy()]

    a, b = both_paths(on_path, run)
    assert_same(a, b, dtype)
    assert (a[0][10:20] != 0).any() and (a[0][20:] == 0).all()


def test_softmax_nan_reaches_the_loss(on_path):
    """The kernels keep NaN semantics: a NaN logit makes the loss NaN (training's guard then skips the step)."""
    logits = np.zeros((4, 50), np.float32)
    logits[2, 3] = np.nan
    assert np.isnan(on_path("numba").layers.SoftmaxCrossEntropy().forward(logits, np.arange(4))[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "make",
    [
        lambda o, s: o.SGD(s),
        lambda o, s: o.Adam(s),
        lambda o, s: o.Adam(s, weight_decay=0.1),
        lambda o, s: o.Adam(s, weight_decay=0.1, decoupled=True),
    ],
    ids=["sgd", "adam", "adam-l2", "adamw"],
)
def test_optimizer_updates_agree_with_numpy(on_path, make, dtype):
    """Three steps with a clipping factor, over a buffer large enough to be split over threads."""
    rng = np.random.default_rng(7)
    shapes = {"a": (300, 400), "b": (1000,)}
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()} for _ in range(3)]

    def run(path):
        store = store_of(dtype, **p0)
        opt = make(path.optimizers, store)
        for g in grads:
            for k, v in store.views_of(store.grad).items():
                v[...] = g[k]
            opt.step(0.05, grad_scale=0.7)
        return [store.data.copy()]

    a, b = both_paths(on_path, run)
    assert_same(a, b, dtype)


def curve(raw):
    """Training losses, one per step, of a fixed-seed run of the config ``raw`` (a dict)."""
    import json
    import tempfile

    from lmtrain.config import from_dict
    from lmtrain.training import fit

    with tempfile.TemporaryDirectory() as tmp:
        fit(from_dict(raw), os.path.join(tmp, "run"), quiet=True)
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as fh:
            events = [json.loads(line) for line in fh]
    return [e["loss"] for e in events if e["event"] == "train"]


@pytest.mark.parametrize("cell, rtol", [("lstm", 1e-5), ("gru", 1e-4)])
def test_fixed_seed_curves_agree_over_200_steps(on_path, cell, rtol):
    """Two layers with every kind of dropout, the tied decoder and clipping, float32, 200 steps of SGD
    on each path: the losses agree to a relative 1e-5 at every step for the LSTM.  The GRU learns this
    task much further in 200 steps (loss 1.2 against the LSTM's 3.6), and its sharper minimum amplifies
    float32 rounding more: its paths part by 5e-5 at the end, so it gets 1e-4.  (Adam, and the other
    configs, are held to the pre-optimisation curves by test_speed_preserves_results.py on either path.)"""
    raw = {
        "data": {"source": "synthetic", "synthetic": {"train_stories": 1500, "max_distance": 8}},
        "model": {
            "cell": cell,
            "emb_size": 32,
            "hidden_size": 32,
            "num_layers": 2,
            "tie_weights": True,
            "dropout_mode": "locked",
            "dropout": 0.2,
            "embedding_dropout": 0.05,
            "weight_drop": 0.2,
        },
        "train": {
            "batch_size": 8,
            "bptt": 20,
            "max_steps": 200,
            "optimizer": "sgd",
            "lr": 5.0,
            "clip_grad_norm": 0.25,
            "log_every": 1,
            "eval_batch_size": 4,
        },
        "seed": 11,
    }
    a, b = both_paths(on_path, lambda path: curve(raw))
    a, b = np.array(a), np.array(b)
    assert len(a) == len(b) == 200
    assert b[-20:].mean() < b[0] - 0.5  # it learns
    assert np.abs(b / a - 1).max() < rtol


def test_fit_says_which_path_runs_and_the_environment_overrides_the_config(tiny_config):
    r = lmtrain(
        "fit", tiny_config, "--set", "train.epochs=1", "--set", "train.kernels=numba", env={"LMTRAIN_KERNELS": "numpy"}
    )
    assert r.returncode == 0, r.stderr
    assert "element-wise kernels: numpy" in r.stdout
    r = lmtrain("fit", tiny_config, "--set", "train.epochs=1", "--overwrite", env={"LMTRAIN_KERNELS": ""})
    assert r.returncode == 0, r.stderr
    assert "element-wise kernels: numba" in r.stdout


def test_bad_kernel_setting_is_one_line(tiny_config):
    r = lmtrain("fit", tiny_config, env={"LMTRAIN_KERNELS": "cuda"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "LMTRAIN_KERNELS is 'cuda'; choose one of auto, numba, numpy" in r.stderr


def test_numpy_path_never_imports_numba(tiny_config):
    """With the kernels off (and so on a machine without numba) a whole run does not import numba."""
    code = (
        "import sys, runpy; sys.argv = ['lmtrain', 'fit', sys.argv[1], '--set', 'train.epochs=1']\n"
        "try:\n    runpy.run_module('lmtrain', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "assert 'numba' not in sys.modules, 'numba was imported'\nprint('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tiny_config)],
        capture_output=True,
        text=True,
        env={**os.environ, "LMTRAIN_KERNELS": "numpy", "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
