"""The language model: embedding -> stacked recurrent layers -> dropout -> decoder -> softmax.

Dropout sits on the non-recurrent connections (Zaremba et al. 2014): on the
embedding output (``dropout_input``), between recurrent layers
(``dropout_hidden``) and before the decoder (``dropout_output``), either per
element or locked across time (``dropout_mode``).  Embedding dropout removes
whole words and weight drop masks W_h (AWD-LSTM, Merity et al. 2017).  With
``tie_weights`` the decoder uses the embedding matrix: logits = h E^T + b.

With ``softmax: adaptive`` the decoder and the softmax are one layer,
``AdaptiveSoftmax`` (lmtrain/nn/adaptive.py): ``forward`` then returns the
decoder's input rows instead of logits, ``loss`` reads them with the
targets, and ``scores`` gives the exact (N, V) log-probabilities.  Tied, the
head's word rows are the embedding rows of the head words.

Training may add activation regularisation, ar * mean(h_drop^2) on the last
layer's dropped output, and temporal activation regularisation,
tar * mean((h_t - h_{t-1})^2) on its output before dropout.  ``loss`` returns
the NLL (what perplexity measures) and the objective that includes them.

Every parameter's name, shape, place and initialisation come from one table
(lmtrain/nn/layout.py).  The layers are the classes of a ``Layers``: the
numpy reference below, or the fused kernels' versions of them (lmtrain/fast/).
"""

import contextlib
from typing import NamedTuple

import numpy as np

from lmtrain.backend import xp
from lmtrain.nn.adaptive import AdaptiveSoftmax, check_cutoffs
from lmtrain.nn.cells import CELLS, Recurrent
from lmtrain.nn.layers import Dropout, Embedding, Linear, SoftmaxCrossEntropy
from lmtrain.nn.layout import layer_sizes, layout
from lmtrain.nn.params import ParamStore


class Layers(NamedTuple):
    """The classes a LanguageModel is assembled from."""

    name: str
    Embedding: type
    Dropout: type
    Linear: type
    Recurrent: type
    SoftmaxCrossEntropy: type
    AdaptiveSoftmax: type


REFERENCE = Layers("numpy", Embedding, Dropout, Linear, Recurrent, SoftmaxCrossEntropy, AdaptiveSoftmax)


class ModelLoss(NamedTuple):
    """What ``LanguageModel.loss`` returns: the NLL's mean and sums (as a loss layer's ``Loss``) and the
    training objective that ``backward`` differentiates (the mean plus AR and TAR)."""

    mean: float
    total: float
    count: float
    objective: float


def dropout_rates(cfg):
    """(input, between layers, output) dropout rates."""
    pick = lambda r: cfg.dropout if r is None else r  # noqa: E731
    return pick(cfg.dropout_input), pick(cfg.dropout_hidden), pick(cfg.dropout_output)


class LanguageModel:
    def __init__(self, cfg, vocab_size, seed=0, dtype="float32", layers=REFERENCE):
        """``seed`` drives initialisation; dropout draws from its own generator.  ``layers``: the classes
        the model is made of (the reference, or lmtrain.fast's)."""
        self.cfg, self.vocab_size, self.layers = cfg, vocab_size, layers
        self.dtype = np.dtype(dtype)
        if cfg.softmax == "adaptive":
            check_cutoffs(cfg.adaptive_cutoffs, vocab_size)
        self.layout = layout(cfg, vocab_size)
        self.store = ParamStore(self.dtype).build(self.layout)
        init_rng = np.random.default_rng([seed, 0])
        for spec in self.layout.params:  # in the layout's order: it fixes a seed's values
            self.store.params[spec.name][...] = xp.asarray(spec.init(init_rng), dtype=self.dtype)
        self.dropout_rng = rng = np.random.default_rng([seed, 1])
        self.sizes = layer_sizes(cfg)
        p, g = self.store.params, self.store.grads
        self.embedding = layers.Embedding(p["embedding.weight"], g["embedding.weight"], cfg.embedding_dropout, rng)
        keys = ("weight_x", "weight_h", "bias", *CELLS[cfg.cell].extra_params)
        self.rnns = [
            layers.Recurrent(
                *(p[f"rnn.{i}.{k}"] for k in keys[:3]),
                grads={k: g[f"rnn.{i}.{k}"] for k in keys},
                weight_drop=cfg.weight_drop,
                rng=rng,
                cell=cfg.cell,
                extra={k: p[f"rnn.{i}.{k}"] for k in keys[3:]},
            )
            for i in range(cfg.num_layers)
        ]
        # One dropout after the embedding, one between each pair of layers, one before the decoder.
        rate_in, rate_hidden, rate_out = dropout_rates(cfg)
        rates = [rate_in] + [rate_hidden] * (cfg.num_layers - 1) + [rate_out]
        self.dropouts = [layers.Dropout(r, rng, locked=cfg.dropout_mode == "locked") for r in rates]
        self._output_layers()
        self.ar = self.tar = 0.0
        self.reg_loss = 0.0

    def _output_layers(self):
        """The decoder and its softmax, or the adaptive softmax, over the blocks the layout names.  Tied,
        the decoder writes the gradient of its rows of the embedding block first (all V of them; under the
        adaptive softmax, the head's, or with tied tails all of them), then the embedding adds its rows to
        the weight part of it, zeroing the others first (``rows_written``)."""
        cfg, layers, V, outs = self.cfg, self.layers, self.vocab_size, self.layout.outputs

        def linear(out):
            block, grad = self.store.blocks[out.block]
            rows = slice(None) if out.rows is None else out.rows
            return layers.Linear(block[rows], grad[rows], transposed=out.transposed)

        if cfg.softmax != "adaptive":
            self.decoder = linear(outs["decoder"])
            self.loss_layer = layers.SoftmaxCrossEntropy()
            self.embedding.rows_written = V if cfg.tie_weights else 0
            return
        p, g = self.store.params, self.store.grads
        K = len(cfg.adaptive_cutoffs)
        tails = [
            (p.get(f"adaptive.tail.{i}.proj"), g.get(f"adaptive.tail.{i}.proj"), linear(outs[f"tail.{i}"]))
            for i in range(K)
        ]
        self.decoder = None  # the adaptive softmax is its own decoder
        self.loss_layer = layers.AdaptiveSoftmax(
            cfg.adaptive_cutoffs, V, linear(outs["head"]), tails, loss=layers.SoftmaxCrossEntropy
        )
        written = V if cfg.adaptive_tie_tails else cfg.adaptive_cutoffs[0]
        self.embedding.rows_written = written if cfg.tie_weights else 0

    # -- parameters ---------------------------------------------------------
    @property
    def params(self):
        """name -> parameter array (views into one buffer, in checkpoint order)."""
        return self.store.params

    @property
    def grads(self):
        return self.store.grads

    def num_params(self):
        return sum(int(p.size) for p in self.params.values())

    def load_params(self, arrays):
        """Copy arrays (by name) into the model's parameters, in place."""
        for name, value in arrays.items():
            target = self.params[name]
            target[...] = xp.asarray(value, dtype=target.dtype)

    @property
    def state_names(self):
        """Names of a layer's state arrays: ("h", "c") for the LSTM, ("h",) for the GRU and the plain RNN."""
        return CELLS[self.cfg.cell].state_names

    def init_state(self, batch_size):
        """Zero state per layer: (h, c) for the LSTM, (h,) for the GRU and the plain RNN."""
        n = len(self.state_names)
        return [tuple(xp.zeros((batch_size, H), self.dtype) for _ in range(n)) for H in self.sizes]

    def set_regularization(self, ar=0.0, tar=0.0):
        """Coefficients of AR and TAR, applied by training forward passes."""
        self.ar, self.tar = float(ar), float(tar)

    @contextlib.contextmanager
    def weights_held(self):
        """Inside, no weight changes (an evaluation's windows): the layers may keep what they derive from
        the weights from one forward to the next (the fast path's W_h^T)."""
        for rnn in self.rnns:
            rnn.hold_weights(True)
        try:
            yield self
        finally:
            for rnn in self.rnns:
                rnn.hold_weights(False)

    # -- computation --------------------------------------------------------
    def forward(self, ids, state, train=False):
        """ids (T, B) -> logits (T*B, V) and the state after the window.

        Under the adaptive softmax the first result is the decoder's input (T*B, H) instead: what
        ``loss`` and ``scores`` read.
        """
        x = self.embedding.forward(ids, train)
        x = self.dropouts[0].forward(x, train)
        new_state = []
        for rnn, drop, s in zip(self.rnns, self.dropouts[1:], state):
            h, s = rnn.forward(x, s, train)
            x = drop.forward(h, train)
            new_state.append(s)
        self.h_last, self.h_drop = h, x
        self.regularize = train and (self.ar > 0 or self.tar > 0)
        self.reg_loss = self._reg_loss() if self.regularize else 0.0
        T, B, H = x.shape
        out = x.reshape(T * B, H)
        return (out if self.decoder is None else self.decoder.forward(out)), new_state

    def scores(self, out):
        """(N, V) next-word scores whose softmax is the model's distribution, from rows of ``forward``'s
        first result: the logits themselves, or the adaptive softmax's exact log-probabilities."""
        return out if self.decoder is not None else self.loss_layer.log_probs(out)

    def _reg_loss(self):
        h, hd = self.h_last, self.h_drop
        loss = self.ar * float(xp.mean(hd * hd)) if self.ar else 0.0
        if self.tar and len(h) > 1:
            diff = h[1:] - h[:-1]
            loss += self.tar * float(xp.mean(diff * diff))
        return loss

    def loss(self, out, targets, weights=None, grad=True):
        """The ``ModelLoss`` of ``targets`` (T, B); ``out`` is what ``forward`` returned.  ``grad=False``:
        no ``backward`` follows (evaluation), so the loss layer need not keep its softmax."""
        mean, total, count = self.loss_layer.forward(out, targets, weights, grad=grad)
        return ModelLoss(mean, total, count, mean + self.reg_loss)

    def row_nll(self):
        """-log p(target) of each target of the last ``loss`` (in the order of ``forward``'s rows, time-major)."""
        return self.loss_layer.row_nll()

    def backward(self, dstate=None, step_hooks=None):
        """Gradients of the objective (NLL, plus AR/TAR when training) into ``grads``.

        Returns d objective / d (initial state), per layer.  ``step_hooks``: {layer index: hook}, each
        called with the gradient at every step's state of that layer (``Recurrent.backward``).
        """
        d = self.loss_layer.backward()
        if self.decoder is not None:
            d = self.decoder.backward(d)
        T, B = self.embedding.ids.shape
        d = d.reshape(T, B, -1)
        if self.regularize and self.ar:
            d = d + (2 * self.ar / self.h_drop.size) * self.h_drop
        dstate0 = [None] * len(self.rnns)
        hooks = {k % len(self.rnns): hook for k, hook in (step_hooks or {}).items()}  # -1: the last layer
        for i in reversed(range(len(self.rnns))):
            d = self.dropouts[i + 1].backward(d)
            if i == len(self.rnns) - 1 and self.regularize and self.tar and T > 1:
                h = self.h_last
                g = (2 * self.tar / (h.size - h[0].size)) * (h[1:] - h[:-1])
                d[1:] += g  # d is a fresh array here (from the decoder's or the dropout's backward)
                d[:-1] -= g
            d, dstate0[i] = self.rnns[i].backward(d, None if dstate is None else dstate[i], hooks.get(i))
        d = self.dropouts[0].backward(d)
        self.embedding.backward(d)
        return dstate0

    def freeze_dropout(self, frozen=True):
        """Reuse the current dropout, embedding-dropout and weight-drop masks (for gradient checks)."""
        for layer in [*self.dropouts, *self.rnns, self.embedding]:
            layer.frozen = frozen


def products(model, rows, steps, backward=True, tail_rows=None):
    """(name, m, k, n, count): every matrix product of one window of ``model`` of ``steps`` steps over ``rows``
    streams, as each layer reports it; with ``backward=False`` only the forward pass's (what
    evaluation runs).  Under the adaptive softmax ``tail_rows`` gives the rows (targets) each tail
    cluster receives per window."""
    out = []
    for i, rnn in enumerate(model.rnns):
        out += [(f"rnn.{i} {name}", *rest) for name, *rest in rnn.products(rows, steps, backward)]
    N = rows * steps
    if model.decoder is None:
        return out + model.loss_layer.products(N, backward, tail_rows)
    return out + model.decoder.products(N, backward, names=("decoder [h, 1] W", "decoder dW", "decoder dlogits W^T"))
