"""The language model: embedding -> stacked LSTM -> dropout -> decoder -> softmax.

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
the NLL alone (what perplexity measures); ``objective`` includes them.
"""
import numpy as np

from lmtrain.backend import xp
from lmtrain.nn.adaptive import AdaptiveSoftmax, check_cutoffs, tail_shapes
from lmtrain.nn.cells import CELLS, Recurrent
from lmtrain.nn.layers import Dropout, Embedding, Linear, SoftmaxCrossEntropy
from lmtrain.nn.params import ParamStore


def layer_sizes(cfg):
    """Units of each recurrent layer."""
    sizes = [cfg.hidden_size] * cfg.num_layers
    if cfg.last_hidden_size:
        sizes[-1] = cfg.last_hidden_size
    return sizes


def orthogonal(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix


def init_params(cfg, vocab_size, rng, dtype):
    """Named parameter arrays, in a fixed order (the checkpoint's order)."""
    V, E = vocab_size, cfg.emb_size
    sizes = layer_sizes(cfg)

    # (shape, fan_in) -> array, per scheme; biases are zero except under "pytorch"
    if cfg.init == "uniform":
        def weight(shape, fan_in, H=None):
            return rng.uniform(-cfg.init_scale, cfg.init_scale, size=shape)
        embedding = weight((V, E), None)
    elif cfg.init == "scaled_normal":
        def weight(shape, fan_in, H=None):
            return rng.standard_normal(shape) / np.sqrt(fan_in)
        embedding = rng.standard_normal((V, E)) * 0.01
    else:  # pytorch: nn.Embedding, nn.LSTM and nn.Linear defaults; awd: its own embedding scale
        def weight(shape, fan_in, H=None):
            bound = 1.0 / np.sqrt(H if H is not None else fan_in)
            return rng.uniform(-bound, bound, size=shape)
        if cfg.init == "pytorch":
            embedding = rng.standard_normal((V, E))
        else:
            embedding = rng.uniform(-cfg.init_scale, cfg.init_scale, size=(V, E))

    cell = CELLS[cfg.cell]
    G = cell.gates
    params = {"embedding.weight": embedding}
    for layer, H in enumerate(sizes):
        D = E if layer == 0 else sizes[layer - 1]
        p = f"rnn.{layer}."
        params[p + "weight_x"] = weight((D, G * H), D, H)   # nn.LSTM bounds by 1/sqrt(H) whatever the fan-in
        params[p + "weight_h"] = weight((H, G * H), H, H)
        if cfg.orthogonal_recurrent:
            params[p + "weight_h"] = np.concatenate([orthogonal(rng, H) for _ in range(G)], axis=1)
        params[p + "bias"] = weight((G * H,), H, H) if cfg.init in ("pytorch", "awd") else np.zeros(G * H)
        if cfg.cell == "lstm":
            params[p + "bias"][:H] += cfg.forget_bias  # gate order f, i, o, g
        for name, shape in cell.extra_params.items():
            params[p + name] = weight(shape(H), H, H) if cfg.init in ("pytorch", "awd") else np.zeros(shape(H))
    H = sizes[-1]
    bias = lambda n, fan_in: weight((n,), fan_in) if cfg.init == "pytorch" else np.zeros(n)  # noqa: E731
    if cfg.softmax == "adaptive":
        K, c0 = len(cfg.adaptive_cutoffs), cfg.adaptive_cutoffs[0]
        if cfg.tie_weights:  # the head's word rows are embedding rows; its cluster rows are its own
            params["adaptive.head.cluster_weight"] = weight((K, H), H)
        else:
            params["adaptive.head.weight"] = weight((H, K + c0), H)
        params["adaptive.head.bias"] = bias(K + c0, H)
        for i, (d, n) in enumerate(tail_shapes(H, V, cfg.adaptive_cutoffs, cfg.adaptive_div)):
            if not cfg.adaptive_tie_tails:  # tied tails: the word rows are the embedding's, no projection
                params[f"adaptive.tail.{i}.proj"] = weight((H, d), H)
                params[f"adaptive.tail.{i}.weight"] = weight((d, n), d)
            params[f"adaptive.tail.{i}.bias"] = bias(n, d)
        return {k: xp.asarray(v, dtype=dtype) for k, v in params.items()}
    if not cfg.tie_weights:
        params["decoder.weight"] = weight((H, V), H)
    params["decoder.bias"] = bias(V, H)
    return {k: xp.asarray(v, dtype=dtype) for k, v in params.items()}


def dropout_rates(cfg):
    """(input, between layers, output) dropout rates."""
    pick = lambda r: cfg.dropout if r is None else r  # noqa: E731
    return pick(cfg.dropout_input), pick(cfg.dropout_hidden), pick(cfg.dropout_output)


class LanguageModel:
    def __init__(self, cfg, vocab_size, seed=0, dtype="float32"):
        """``seed`` drives initialisation; dropout draws from its own generator."""
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.dtype = np.dtype(dtype)
        adaptive = cfg.softmax == "adaptive"
        if adaptive:
            check_cutoffs(cfg.adaptive_cutoffs, vocab_size)
        init_rng = np.random.default_rng([seed, 0])
        self.dropout_rng = np.random.default_rng([seed, 1])
        values = init_params(cfg, vocab_size, init_rng, self.dtype)
        V, E = vocab_size, cfg.emb_size
        self.sizes = sizes = layer_sizes(cfg)
        H = sizes[-1]

        # Layout of the parameter buffer.  The decoder's bias sits next to its
        # weight: as an extra row of the (H+1, V) block, or, tied, as an extra
        # column of the (V, E+1) embedding block.
        store = ParamStore(self.dtype)
        if adaptive:
            K, c0 = len(cfg.adaptive_cutoffs), cfg.adaptive_cutoffs[0]
            shapes = tail_shapes(H, V, cfg.adaptive_cutoffs, cfg.adaptive_div)
            edges = list(cfg.adaptive_cutoffs) + [V]  # tail cluster i holds the words [edges[i], edges[i + 1])
        if adaptive and cfg.tie_weights:
            # The head's K cluster rows come first and the embedding rows after them, so rows [0, K + c0)
            # are the whole head, [cluster rows; head words' embedding rows], with the head bias as its
            # extra column: one product.  That column is unused (zero) below the head words, unless the
            # tails are tied too: then rows K + [c_i, c_{i+1}) with that column are tail cluster i.
            views = {"adaptive.head.cluster_weight": np.s_[:K, :E], "embedding.weight": np.s_[K:, :E],
                     "adaptive.head.bias": np.s_[:K + c0, E]}
            if cfg.adaptive_tie_tails:
                views.update({f"adaptive.tail.{i}.bias": np.s_[K + edges[i]:K + edges[i + 1], E] for i in range(K)})
            store.block("embedding", (K + V, E + 1), views)
        elif cfg.tie_weights:
            store.block("embedding", (V, E + 1), {"embedding.weight": np.s_[:, :E], "decoder.bias": np.s_[:, E]})
        else:
            store.block("embedding", (V, E), {"embedding.weight": np.s_[:]})
        self.rnn_keys = keys = ("weight_x", "weight_h", "bias", *CELLS[cfg.cell].extra_params)
        for i in range(cfg.num_layers):
            for key in keys:
                store.block(f"rnn.{i}.{key}", values[f"rnn.{i}.{key}"].shape, {f"rnn.{i}.{key}": np.s_[:]})
        if adaptive:
            if not cfg.tie_weights:
                store.block("adaptive.head", (H + 1, K + c0), {"adaptive.head.weight": np.s_[:H],
                                                               "adaptive.head.bias": np.s_[H]})
            for i, (d, n) in enumerate([] if cfg.adaptive_tie_tails else shapes):
                t = f"adaptive.tail.{i}"
                store.block(t + ".proj", (H, d), {t + ".proj": np.s_[:]})
                store.block(t, (d + 1, n), {t + ".weight": np.s_[:d], t + ".bias": np.s_[d]})
        elif not cfg.tie_weights:
            store.block("decoder", (H + 1, V), {"decoder.weight": np.s_[:H], "decoder.bias": np.s_[H]})
        self.store = store.build(order=list(values))
        for name, value in values.items():
            store.params[name][...] = value
        p, g = store.params, store.grads

        rng = self.dropout_rng
        self.embedding = Embedding(p["embedding.weight"], g["embedding.weight"], cfg.embedding_dropout, rng)
        self.rnns = [Recurrent(*(p[f"rnn.{i}.{k}"] for k in keys[:3]), grads={k: g[f"rnn.{i}.{k}"] for k in keys},
                               weight_drop=cfg.weight_drop, rng=rng, cell=cfg.cell,
                               extra={k: p[f"rnn.{i}.{k}"] for k in keys[3:]})
                     for i in range(cfg.num_layers)]
        # One dropout after the embedding, one between each pair of layers, one before the decoder.
        rate_in, rate_hidden, rate_out = dropout_rates(cfg)
        rates = [rate_in] + [rate_hidden] * (cfg.num_layers - 1) + [rate_out]
        self.dropouts = [Dropout(r, rng, locked=cfg.dropout_mode == "locked") for r in rates]
        # Tied: the decoder writes the gradient of its rows of the embedding block
        # first (all V of them; under the adaptive softmax, the head's), then the
        # embedding adds its rows to the weight part of it.
        if adaptive:
            block, grad_block = store.blocks["embedding" if cfg.tie_weights else "adaptive.head"]
            if cfg.tie_weights:
                block, grad_block = block[:K + c0], grad_block[:K + c0]
            if cfg.adaptive_tie_tails:  # no projection; cluster i's Linear is its words' rows of the block
                full, full_grad = store.blocks["embedding"]
                tails = [(None, None, Linear(full[K + a:K + b], full_grad[K + a:K + b], transposed=True))
                         for a, b in zip(edges[:-1], edges[1:])]
            else:
                tails = [(p[f"adaptive.tail.{i}.proj"], g[f"adaptive.tail.{i}.proj"],
                          Linear(*store.blocks[f"adaptive.tail.{i}"])) for i in range(K)]
            self.decoder = None  # the adaptive softmax is its own decoder
            self.loss_layer = AdaptiveSoftmax(cfg.adaptive_cutoffs, V, Linear(block, grad_block, cfg.tie_weights),
                                              tails)
            self.embedding.rows_written = (V if cfg.adaptive_tie_tails else c0) if cfg.tie_weights else 0
        else:
            block, grad_block = store.blocks["embedding" if cfg.tie_weights else "decoder"]
            self.decoder = Linear(block, grad_block, transposed=cfg.tie_weights)
            self.loss_layer = SoftmaxCrossEntropy()
            self.embedding.rows_written = V if cfg.tie_weights else 0
        self.ar = self.tar = 0.0
        self.reg_loss = 0.0

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

    # -- computation --------------------------------------------------------
    def forward(self, ids, state, train=False, same_weights=False):
        """ids (T, B) -> logits (T*B, V) and the state after the window.

        Under the adaptive softmax the first result is the decoder's input (T*B, H) instead: what
        ``loss`` and ``scores`` read.  ``same_weights`` (evaluation's windows after its first) promises
        that no weight has changed since the previous evaluation forward, so the recurrent layers keep
        the W_h^T they laid out for it without checking it against W_h.
        """
        x = self.embedding.forward(ids, train)
        x = self.dropouts[0].forward(x, train)
        new_state = []
        for rnn, drop, s in zip(self.rnns, self.dropouts[1:], state):
            h, s = rnn.forward(x, s, train, same_weights)
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
        """Mean NLL of ``targets`` (T, B), the quantity perplexity is made of; ``out`` is what ``forward`` returned.
        ``grad=False``: no ``backward`` follows (evaluation), so the loss layer need not keep its softmax."""
        mean, self.loss_sum, self.loss_count = self.loss_layer.forward(out, targets, weights, grad=grad)
        self.objective = mean + self.reg_loss
        return mean

    def backward(self, dstate=None):
        """Gradients of ``objective`` (NLL, plus AR/TAR when training) into ``grads``.

        Returns d objective / d (initial state), per layer.
        """
        d = self.loss_layer.backward()
        if self.decoder is not None:
            d = self.decoder.backward(d)
        T, B = self.embedding.ids.shape
        d = d.reshape(T, B, -1)
        if self.regularize and self.ar:
            d = d + (2 * self.ar / self.h_drop.size) * self.h_drop
        dstate0 = [None] * len(self.rnns)
        for i in reversed(range(len(self.rnns))):
            d = self.dropouts[i + 1].backward(d)
            if i == len(self.rnns) - 1 and self.regularize and self.tar and T > 1:
                h = self.h_last
                g = (2 * self.tar / (h.size - h[0].size)) * (h[1:] - h[:-1])
                d[1:] += g  # d is a fresh array here (from the decoder's or the dropout's backward)
                d[:-1] -= g
            d, dstate0[i] = self.rnns[i].backward(d, None if dstate is None else dstate[i])
        d = self.dropouts[0].backward(d)
        self.embedding.backward(d)
        return dstate0

    def freeze_dropout(self, frozen=True):
        """Reuse the current dropout, embedding-dropout and weight-drop masks (for gradient checks)."""
        for layer in [*self.dropouts, *self.rnns, self.embedding]:
            layer.frozen = frozen
