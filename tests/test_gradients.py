"""Every backward pass against central finite differences in float64 (relative error < 1e-6)."""

import numpy as np
import pytest

from lmtrain.config import ModelConfig
from lmtrain.nn.cells import CELLS, LSTMCell
from lmtrain.nn.model import LanguageModel
from tests.gradcheck import numerical_grad, rel_error
from tests.test_adaptive import adaptive_layer

TOL = 1e-6


@pytest.fixture
def layers(each_path):
    """Every check runs on the numpy reference and on the fast path's layers (the fused kernels)."""
    return each_path.layers


def check_layer(layer, forward, inputs, out_shape_fn, seed=0):
    """Generic check: loss = sum(forward(*inputs) * R) for a fixed random R.

    Compares the gradients of every parameter and of every float input.
    """
    rng = np.random.default_rng(seed)
    out = forward(*inputs)
    R = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(forward(*inputs) * R))

    forward(*inputs)
    dx = layer.backward(R.copy())
    for name, p in layer.params.items():
        analytic = layer.grads[name].copy()
        assert rel_error(analytic, numerical_grad(loss, p)) < TOL, name
    for k, x in enumerate(inputs):
        if isinstance(x, np.ndarray) and x.dtype == np.float64:
            forward(*inputs)
            dx = layer.backward(R.copy())
            assert rel_error(dx, numerical_grad(loss, x)) < TOL, f"input {k}"


def test_linear(layers):
    rng = np.random.default_rng(1)
    layer = layers.Linear(rng.standard_normal((5 + 1, 7)))  # [W; b]
    check_layer(layer, layer.forward, [rng.standard_normal((6, 5))], None)
    x = rng.standard_normal((3, 5))
    np.testing.assert_allclose(layer.forward(x), x @ layer.params["weight"] + layer.params["bias"], rtol=1e-12)


def test_linear_transposed(layers):
    rng = np.random.default_rng(2)
    layer = layers.Linear(rng.standard_normal((7, 5 + 1)), transposed=True)  # [E, b], the tied decoder
    check_layer(layer, layer.forward, [rng.standard_normal((6, 5))], None)
    x = rng.standard_normal((3, 5))
    np.testing.assert_allclose(layer.forward(x), x @ layer.params["weight"].T + layer.params["bias"], rtol=1e-12)


def test_embedding_with_repeated_ids(layers):
    rng = np.random.default_rng(3)
    layer = layers.Embedding(rng.standard_normal((6, 4)))
    ids = np.array([[1, 2], [1, 1], [5, 0]])  # repeats must add up
    check_layer(layer, layer.forward, [ids], None)


def test_dropout_fixed_mask(layers):
    rng = np.random.default_rng(4)
    layer = layers.Dropout(0.4, np.random.default_rng(0))
    x = rng.standard_normal((3, 2, 5))
    layer.forward(x, True)
    layer.frozen = True
    check_layer(layer, lambda x: layer.forward(x, True), [x], None)
    assert (layer.mask == 0).any() and (layer.mask != 0).any()


@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_cross_entropy(layers, weighted):
    rng = np.random.default_rng(5)
    layer = layers.SoftmaxCrossEntropy()
    logits = rng.standard_normal((6, 9))
    targets = rng.integers(0, 9, size=6)
    weights = np.array([1, 1, 0, 1, 0, 1.0]) if weighted else None

    def loss():
        return layer.forward(logits.copy(), targets, weights)[0]

    loss()
    analytic = layer.backward().copy()  # the layer's own buffer: the next forward reuses it
    assert rel_error(analytic, numerical_grad(loss, logits)) < TOL


def test_softmax_handles_logits_that_overflow_or_underflow_exp(layers):
    """Rows whose exp overflows (logit > 88) or vanishes take the max-subtracted path; results stay exact."""
    layer = layers.SoftmaxCrossEntropy()
    logits = np.array([[1.0, 2.0, 3.0], [500.0, 499.0, 0.0], [-900.0, -901.0, -950.0]], np.float32)
    targets = np.array([2, 0, 1])
    mean, total, count = layer.forward(logits.copy(), targets)
    z = logits.astype(np.float64)
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    expected = -logp[np.arange(3), targets]
    assert total == pytest.approx(expected.sum(), rel=1e-6) and count == 3
    d = layer.backward()
    p = np.exp(logp)
    p[np.arange(3), targets] -= 1
    np.testing.assert_allclose(d, p / 3, atol=1e-7)


@pytest.mark.parametrize(
    "tied_head,weighted,empty_cluster", [(False, False, False), (True, True, False), (False, True, True)]
)
def test_adaptive_softmax(layers, tied_head, weighted, empty_cluster):
    """The layer alone: head, projections, tail outputs and biases, and the input rows.  With an empty
    cluster (no target in it this window) its gradients must be zero, not left over from the last call."""
    rng = np.random.default_rng(11)
    layer = adaptive_layer(5, 17, [4, 9], 2.0, seed=12, tied_head=tied_head, layers=layers)
    h = rng.standard_normal((8, 5))
    targets = np.array([0, 3, 16, 12, 2, 15, 1, 10]) if empty_cluster else np.array([0, 5, 16, 7, 3, 9, 12, 4])
    weights = np.array([1, 1, 0, 1, 0.5, 1, 1, 1]) if weighted else None

    def loss():
        return layer.forward(h, targets, weights)[0]

    loss()
    for g in layer.grads.values():
        g[...] = 7.0  # stale values that backward must overwrite
    dh = layer.backward().copy()
    analytic = {k: g.copy() for k, g in layer.grads.items()}
    for name, p in layer.params.items():
        assert rel_error(analytic[name], numerical_grad(loss, p)) < TOL, name
    assert rel_error(dh, numerical_grad(loss, h)) < TOL
    if empty_cluster:
        assert not analytic["tail.0.proj"].any() and not analytic["tail.0.weight"].any()


def test_lstm_cell_step(layers):
    """One step of the cell, through its pre-activations and previous cell state."""
    rng = np.random.default_rng(6)
    B, H = 3, 4
    cell = LSTMCell(H)
    a = rng.standard_normal((B, 4 * H))
    c_prev = rng.standard_normal((B, H))
    Rh, Rc = rng.standard_normal((B, H)), rng.standard_normal((B, H))

    def run():
        act = a.copy()
        c, tc, h = np.empty((B, H)), np.empty((B, H)), np.empty((B, H))
        cell.step_forward(act, c_prev, c, tc, h)
        return act, c, tc, h

    def loss():
        _, c, _, h = run()
        return float(np.sum(h * Rh) + np.sum(c * Rc))

    act, c, tc, h = run()
    da = np.empty_like(a)
    dc_prev = cell.step_backward(act, c_prev, tc, Rh.copy(), Rc.copy(), da)
    assert rel_error(da, numerical_grad(loss, a)) < TOL
    assert rel_error(dc_prev, numerical_grad(loss, c_prev)) < TOL


def test_lstm_equations_against_reference(layers):
    """The fused, in-place step equals the textbook equations written out gate by gate."""
    rng = np.random.default_rng(7)
    B, D, H = 2, 3, 4
    layer = layers.Recurrent(
        rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H)), rng.standard_normal(4 * H)
    )
    x = rng.standard_normal((5, B, D))
    h, c = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    out, (hT, cT) = layer.forward(x, (h, c))
    Wx, Wh, b = (layer.params[k] for k in ("weight_x", "weight_h", "bias"))
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for t in range(5):
        a = x[t] @ Wx + h @ Wh + b
        f, i, o, g = sig(a[:, :H]), sig(a[:, H : 2 * H]), sig(a[:, 2 * H : 3 * H]), np.tanh(a[:, 3 * H :])
        c = f * c + i * g
        h = o * np.tanh(c)
        np.testing.assert_allclose(out[t], h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hT, h, rtol=1e-12)
    np.testing.assert_allclose(cT, c, rtol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_recurrent_window_with_state(layers, cell):
    """Parameters, inputs and the initial state, with gradients arriving at the final state too."""
    rng = np.random.default_rng(8)
    T, B, D, H = 4, 2, 3, 5
    G = CELLS[cell].gates
    layer = layers.Recurrent(
        rng.standard_normal((D, G * H)) * 0.5,
        rng.standard_normal((H, G * H)) * 0.5,
        rng.standard_normal(G * H) * 0.5,
        cell=cell,
    )
    for name in CELLS[cell].extra_params:
        layer.params[name][...] = rng.standard_normal(layer.params[name].shape) * 0.5
    x = rng.standard_normal((T, B, D))
    state0 = tuple(rng.standard_normal((B, H)) for _ in CELLS[cell].state_names)
    R = rng.standard_normal((T, B, H))
    R_final = tuple(rng.standard_normal((B, H)) for _ in state0)

    def loss():
        out, final = layer.forward(x, state0)
        return float(np.sum(out * R) + sum(np.sum(f * r) for f, r in zip(final, R_final)))

    loss()
    dx, dstate0 = layer.backward(R.copy(), R_final)
    analytic = {k: g.copy() for k, g in layer.grads.items()}
    assert set(analytic) == {"weight_x", "weight_h", "bias", *CELLS[cell].extra_params}
    for name, p in layer.params.items():
        assert rel_error(analytic[name], numerical_grad(loss, p)) < TOL, name
    assert rel_error(dx, numerical_grad(loss, x)) < TOL
    for d, s0 in zip(dstate0, state0):
        assert rel_error(d, numerical_grad(loss, s0)) < TOL


@pytest.mark.parametrize(
    "tied,dropout,n_layers,cell",
    [
        (True, 0.3, 2, "lstm"),
        (False, 0.0, 1, "lstm"),
        (False, 0.5, 2, "lstm"),
        (True, 0.3, 2, "gru"),
        (True, 0.3, 2, "rnn"),
    ],
)
def test_whole_model_across_two_windows(layers, tied, dropout, n_layers, cell):
    """The full model, second window continuing the first one's state (held fixed, as truncated BPTT does)."""
    check_whole_model(
        ModelConfig(
            emb_size=6,
            hidden_size=6,
            num_layers=n_layers,
            dropout=dropout,
            tie_weights=tied,
            init="uniform",
            init_scale=0.5,
            cell=cell,
        ),
        layers,
    )


@pytest.mark.parametrize("tied,tie_tails", [(False, False), (True, False), (True, True)])
def test_whole_model_with_adaptive_softmax(layers, tied, tie_tails):
    """Head words, both tail clusters and (tied) the embedding rows shared with the head (tied tails: with
    the tails too, every embedding row then getting its gradient from two places), in both windows.
    Weights of scale 1: at 0.5 some gradients are so small (~2e-3) that rounding in the differences
    alone reaches the tolerance."""
    check_whole_model(
        ModelConfig(
            emb_size=6,
            hidden_size=6,
            num_layers=2,
            dropout=0.3,
            tie_weights=tied,
            init="uniform",
            init_scale=1.0,
            softmax="adaptive",
            adaptive_cutoffs=[4, 8],
            adaptive_div=1.0 if tie_tails else 2.0,
            adaptive_tie_tails=tie_tails,
            embedding_dropout=0.2 if tie_tails else 0.0,
        ),
        layers,
    )


def check_whole_model(cfg, layers):
    V, T, B = 13, 4, 3
    model = LanguageModel(cfg, V, seed=3, dtype="float64", layers=layers)
    rng = np.random.default_rng(9)
    stream = rng.integers(0, V, size=(2 * T + 1, B))
    x1, y1 = stream[:T], stream[1 : T + 1]
    x2, y2 = stream[T : 2 * T], stream[T + 1 :]
    if cfg.softmax == "adaptive":  # the head and every tail cluster get targets in both windows
        edges = [0, *cfg.adaptive_cutoffs, V]
        assert all(((y >= a) & (y < b)).any() for y in (y1, y2) for a, b in zip(edges, edges[1:]))

    for x, y, state in [(x1, y1, model.init_state(B)), (x2, y2, None)]:
        if state is None:  # the second window starts from the first one's final state
            logits, state = model.forward(x1, model.init_state(B), train=True)
            model.loss(logits, y1)
        state = [tuple(s.copy() for s in layer) for layer in state]
        logits, _ = model.forward(x, state, train=True)  # samples the dropout masks
        model.freeze_dropout()

        def loss():
            logits, _ = model.forward(x, state, train=True)
            return model.loss(logits, y).mean

        loss()
        dstate = model.backward()
        analytic = {k: g.copy() for k, g in model.grads.items()}
        for name, p in model.params.items():
            err = rel_error(analytic[name], numerical_grad(loss, p))
            assert err < TOL, (name, err)
        for layer, dlayer in enumerate(dstate):
            for d, s0 in zip(dlayer, state[layer]):
                assert rel_error(d, numerical_grad(loss, s0)) < TOL
        model.freeze_dropout(False)
