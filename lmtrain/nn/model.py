"""The language model: embedding -> stacked LSTM -> dropout -> decoder -> softmax.

Dropout (rate ``model.dropout``) is applied to the embedding output, between
recurrent layers and before the decoder, the non-recurrent connections of
Zaremba et al. (2014).  With ``tie_weights`` the decoder uses the embedding
matrix: logits = h E^T + b.
"""
import numpy as np

from lmtrain.backend import xp
from lmtrain.nn.cells import Recurrent
from lmtrain.nn.layers import Dropout, Embedding, Linear, SoftmaxCrossEntropy
from lmtrain.nn.params import ParamStore


def init_params(cfg, vocab_size, rng, dtype):
    """Named parameter arrays, in a fixed order (the checkpoint's order)."""
    V, E, H, L = vocab_size, cfg.emb_size, cfg.hidden_size, cfg.num_layers

    # (shape, fan_in) -> array, per scheme; biases are zero except under "pytorch"
    if cfg.init == "uniform":
        def weight(shape, fan_in):
            return rng.uniform(-cfg.init_scale, cfg.init_scale, size=shape)
        embedding = weight((V, E), None)
    elif cfg.init == "scaled_normal":
        def weight(shape, fan_in):
            return rng.standard_normal(shape) / np.sqrt(fan_in)
        embedding = rng.standard_normal((V, E)) * 0.01
    else:  # pytorch: nn.Embedding, nn.LSTM and nn.Linear defaults
        def weight(shape, fan_in):
            bound = 1.0 / np.sqrt(H if fan_in is None else fan_in)
            return rng.uniform(-bound, bound, size=shape)
        embedding = rng.standard_normal((V, E))

    def bias(size, fan_in):
        return weight((size,), fan_in) if cfg.init == "pytorch" else np.zeros(size)

    params = {"embedding.weight": embedding}
    for layer in range(L):
        D = E if layer == 0 else H
        p = f"rnn.{layer}."
        # nn.LSTM bounds every tensor by 1/sqrt(H), whatever its fan-in
        fan_x = H if cfg.init == "pytorch" else D
        params[p + "weight_x"] = weight((D, 4 * H), fan_x)
        params[p + "weight_h"] = weight((H, 4 * H), H)
        params[p + "bias"] = bias(4 * H, H)
        params[p + "bias"][:H] += cfg.forget_bias  # gate order f, i, o, g
    if not cfg.tie_weights:
        params["decoder.weight"] = weight((H, V), H)
    params["decoder.bias"] = bias(V, H)
    return {k: xp.asarray(v, dtype=dtype) for k, v in params.items()}


class LanguageModel:
    def __init__(self, cfg, vocab_size, seed=0, dtype="float32"):
        """``seed`` drives initialisation; dropout draws from its own generator."""
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.dtype = np.dtype(dtype)
        init_rng = np.random.default_rng([seed, 0])
        self.dropout_rng = np.random.default_rng([seed, 1])
        values = init_params(cfg, vocab_size, init_rng, self.dtype)
        V, E, H = vocab_size, cfg.emb_size, cfg.hidden_size

        # Layout of the parameter buffer.  The decoder's bias sits next to its
        # weight: as an extra row of the (H+1, V) block, or, tied, as an extra
        # column of the (V, E+1) embedding block.
        store = ParamStore(self.dtype)
        if cfg.tie_weights:
            store.block("embedding", (V, E + 1), {"embedding.weight": np.s_[:, :E], "decoder.bias": np.s_[:, E]})
        else:
            store.block("embedding", (V, E), {"embedding.weight": np.s_[:]})
        for i in range(cfg.num_layers):
            for key in ("weight_x", "weight_h", "bias"):
                store.block(f"rnn.{i}.{key}", values[f"rnn.{i}.{key}"].shape, {f"rnn.{i}.{key}": np.s_[:]})
        if not cfg.tie_weights:
            store.block("decoder", (H + 1, V), {"decoder.weight": np.s_[:H], "decoder.bias": np.s_[H]})
        self.store = store.build(order=list(values))
        for name, value in values.items():
            store.params[name][...] = value
        p, g = store.params, store.grads

        self.embedding = Embedding(p["embedding.weight"], g["embedding.weight"])
        self.rnns = [Recurrent(*(p[f"rnn.{i}.{k}"] for k in ("weight_x", "weight_h", "bias")),
                               grads={k: g[f"rnn.{i}.{k}"] for k in ("weight_x", "weight_h", "bias")})
                     for i in range(cfg.num_layers)]
        # One dropout after the embedding and after every recurrent layer.
        self.dropouts = [Dropout(cfg.dropout, self.dropout_rng) for _ in range(cfg.num_layers + 1)]
        block, grad_block = store.blocks["embedding" if cfg.tie_weights else "decoder"]
        self.decoder = Linear(block, grad_block, transposed=cfg.tie_weights)
        # Tied: the decoder writes the whole (V, E+1) gradient block first, then
        # the embedding adds its rows to the weight part of it.
        self.embedding.accumulate = cfg.tie_weights
        self.loss_layer = SoftmaxCrossEntropy()

    # -- parameters ---------------------------------------------------------
    @property
    def params(self):
        """name -> parameter array (views into one buffer, in checkpoint order)."""
        return self.store.params

    @property
    def grads(self):
        return self.store.grads

    def num_params(self):
        return int(self.store.data.size)

    def load_params(self, arrays):
        """Copy arrays (by name) into the model's parameters, in place."""
        for name, value in arrays.items():
            target = self.params[name]
            target[...] = xp.asarray(value, dtype=target.dtype)

    def init_state(self, batch_size):
        H = self.cfg.hidden_size
        return [(xp.zeros((batch_size, H), self.dtype), xp.zeros((batch_size, H), self.dtype))
                for _ in self.rnns]

    # -- computation --------------------------------------------------------
    def forward(self, ids, state, train=False):
        """ids (T, B) -> logits (T*B, V) and the state after the window."""
        x = self.embedding.forward(ids)
        x = self.dropouts[0].forward(x, train)
        new_state = []
        for rnn, drop, s in zip(self.rnns, self.dropouts[1:], state):
            x, s = rnn.forward(x, s)
            x = drop.forward(x, train)
            new_state.append(s)
        T, B, H = x.shape
        logits = self.decoder.forward(x.reshape(T * B, H))
        return logits, new_state

    def loss(self, logits, targets, weights=None):
        """Mean NLL of ``targets`` (T, B); the softmax overwrites ``logits``."""
        mean, self.loss_sum, self.loss_count = self.loss_layer.forward(logits, targets, weights)
        return mean

    def backward(self, dstate=None):
        """Fill ``grads`` from the last ``loss``; return d loss / d (initial state)."""
        d = self.loss_layer.backward()
        d = self.decoder.backward(d)
        T, B = self.embedding.ids.shape
        d = d.reshape(T, B, -1)
        dstate0 = [None] * len(self.rnns)
        for i in reversed(range(len(self.rnns))):
            d = self.dropouts[i + 1].backward(d)
            d, dstate0[i] = self.rnns[i].backward(d, None if dstate is None else dstate[i])
        d = self.dropouts[0].backward(d)
        self.embedding.backward(d)
        return dstate0

    def freeze_dropout(self, frozen=True):
        """Reuse the current dropout masks (for gradient checks)."""
        for drop in self.dropouts:
            drop.frozen = frozen
