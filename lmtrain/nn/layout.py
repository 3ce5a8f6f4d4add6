"""The model's parameters, described once.

``layout(cfg, V)`` lists every parameter with its name (the checkpoint's),
its shape, where it lives in the one parameter buffer, how it is
initialised and what it is; and the buffer's blocks, in buffer order.  The
model builds its buffer, its initial values and its layers from it, and
docs/checkpoint-format.md's table of parameters is generated from it
(``table``).

A *block* is a region of the buffer that one product reads as a whole: the
decoder's bias sits next to its weight, so ``[x, 1] @ [W; b]`` computes
``x W + b`` in one pass (lmtrain/nn/params.py).  Tying is a parameter's
place: with ``model.tie_weights`` the decoder reads the embedding's block,
which then holds the decoder's bias as an extra column (and, under the
adaptive softmax, the head's cluster rows before the word rows).

Parameters are initialised in the order listed, each from the same random
generator, so the order fixes the initial values of a seed.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lmtrain.nn.adaptive import tail_shapes
from lmtrain.nn.cells import CELLS


@dataclass(frozen=True)
class Param:
    name: str  # the checkpoint's name, e.g. "rnn.0.weight_h"
    shape: tuple
    block: str  # the buffer block it lives in
    index: object  # where in that block (a numpy index)
    init: Callable  # rng -> initial values (float64), drawn in the order of the layout


@dataclass(frozen=True)
class Output:
    """A Linear of the output layer: which block (and rows of it) it reads, and whether transposed."""

    block: str
    rows: object = None  # None: all of them
    transposed: bool = False


@dataclass
class Layout:
    blocks: list  # [(name, shape)] in buffer order
    params: list  # [Param] in initialisation and checkpoint order
    outputs: dict  # "decoder", or "head" and "tail.i": the Output each Linear reads


# What each parameter is, by its name with the layer as l and the tail cluster as i: the parameter table of
# docs/checkpoint-format.md (``make docs``).  V words, E = model.emb_size, H = the layer's units, G the cell's
# gate blocks (LSTM 4, GRU 3, RNN 1), K tail clusters with cutoffs c_0 < ... < c_{K-1} and c_K = V.
DOCS = {
    "embedding.weight": ("(V, E)", "row i is the vector of word i"),
    "rnn.l.weight_x": ("(E, G*H) for l = 0, else (H, G*H)", "input-to-gates weights W_x"),
    "rnn.l.weight_h": ("(H, G*H)", "hidden-to-gates weights W_h"),
    "rnn.l.bias": ("(G*H,)", "gate biases b"),
    "rnn.l.bias_h": ("(H,)", "GRU only: b_hn, the bias inside the reset product"),
    "decoder.weight": ("(H, V)", "the decoder; absent when model.tie_weights is true"),
    "decoder.bias": ("(V,)", "the decoder's bias"),
    "adaptive.head.weight": (
        "(H, K + c_0)",
        "untied: the head; column i < K scores tail cluster i, column K + w the word w < c_0",
    ),
    "adaptive.head.cluster_weight": (
        "(K, E)",
        "tied: the head's rows for the K tail clusters (its word rows are embedding.weight[:c_0])",
    ),
    "adaptive.head.bias": ("(K + c_0,)", "the head's bias, columns as in adaptive.head.weight"),
    "adaptive.tail.i.proj": (
        "(H, d_i)",
        "projection P_i of tail cluster i, d_i = max(1, H // div^(i+1)); absent with tied tails",
    ),
    "adaptive.tail.i.weight": (
        "(d_i, n_i)",
        "output matrix T_i over the n_i = c_{i+1} - c_i words of cluster "
        "i; absent with tied tails (they read embedding.weight[c_i:c_{i+1}])",
    ),
    "adaptive.tail.i.bias": ("(n_i,)", "the bias of cluster i's words"),
}


def table():
    """The markdown table of DOCS: every parameter a checkpoint may hold (docs/checkpoint-format.md)."""
    rows = [f"| `param/{name}` | `{shape}` | {what} |" for name, (shape, what) in DOCS.items()]
    return "\n".join(["| entry | shape | what |", "|---|---|---|", *rows])


def doc_key(name):
    """The DOCS key of a parameter name: rnn.0.bias -> rnn.l.bias, adaptive.tail.1.proj -> adaptive.tail.i.proj."""
    parts = name.split(".")
    if parts[0] == "rnn":
        parts[1] = "l"
    elif parts[:2] == ["adaptive", "tail"]:
        parts[2] = "i"
    return ".".join(parts)


def layer_sizes(cfg):
    """Units of each recurrent layer."""
    sizes = [cfg.hidden_size] * cfg.num_layers
    if cfg.last_hidden_size:
        sizes[-1] = cfg.last_hidden_size
    return sizes


def orthogonal(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix


class Init:
    """The initialisation schemes of ``model.init`` (docs/configuration.md), as functions of rng."""

    def __init__(self, cfg):
        self.cfg = cfg

    def weight(self, shape, fan_in, H=None):
        c = self.cfg
        if c.init == "uniform":
            return lambda rng: rng.uniform(-c.init_scale, c.init_scale, size=shape)
        if c.init == "scaled_normal":
            return lambda rng: rng.standard_normal(shape) / np.sqrt(fan_in)
        bound = 1.0 / np.sqrt(H if H is not None else fan_in)  # nn.LSTM bounds by 1/sqrt(H) whatever the fan-in
        return lambda rng: rng.uniform(-bound, bound, size=shape)

    def embedding(self, shape):
        c = self.cfg
        if c.init == "scaled_normal":
            return lambda rng: rng.standard_normal(shape) * 0.01
        if c.init == "pytorch":
            return lambda rng: rng.standard_normal(shape)
        return lambda rng: rng.uniform(-c.init_scale, c.init_scale, size=shape)

    def recurrent_bias(self, shape, H, add=0.0):
        """A recurrent layer's bias (drawn under pytorch and awd, else zero), ``add`` on the forget gate."""
        draw = self.cfg.init in ("pytorch", "awd")
        weight = self.weight(shape, H, H)

        def init(rng):
            b = weight(rng) if draw else np.zeros(shape)
            b[:H] += add
            return b

        return init

    def output_bias(self, n, fan_in):
        """The decoder's and the adaptive softmax's biases: drawn under pytorch only."""
        return self.weight((n,), fan_in) if self.cfg.init == "pytorch" else (lambda rng: np.zeros(n))

    def recurrent_weight(self, H, G):
        weight = self.weight((H, G * H), H, H)
        if not self.cfg.orthogonal_recurrent:
            return weight
        # drawn as the plain weight first, so that every other parameter keeps its values
        return lambda rng: (weight(rng), np.concatenate([orthogonal(rng, H) for _ in range(G)], axis=1))[1]


def layout(cfg, V):
    """The Layout of the model ``cfg`` (the model section) over a vocabulary of ``V`` words."""
    init, E, sizes = Init(cfg), cfg.emb_size, layer_sizes(cfg)
    params, blocks, outputs = [], [], {}
    _embedding(cfg, V, init, params, blocks)
    cell = CELLS[cfg.cell]
    G = cell.gates
    for layer, H in enumerate(sizes):
        D, p = E if layer == 0 else sizes[layer - 1], f"rnn.{layer}."
        forget = cfg.forget_bias if cfg.cell == "lstm" else 0.0
        own = [
            (p + "weight_x", (D, G * H), init.weight((D, G * H), D, H)),
            (p + "weight_h", (H, G * H), init.recurrent_weight(H, G)),
            (p + "bias", (G * H,), init.recurrent_bias((G * H,), H, forget)),
        ]
        own += [(p + name, shape(H), init.recurrent_bias(shape(H), H)) for name, shape in cell.extra_params.items()]
        for name, shape, fn in own:
            blocks.append((name, shape))
            params.append(Param(name, shape, name, np.s_[:], fn))
    H = sizes[-1]
    if cfg.softmax == "adaptive":
        _adaptive_head(cfg, H, init, params, blocks, outputs)
        _adaptive_tails(cfg, V, H, init, params, blocks, outputs)
    elif cfg.tie_weights:
        outputs["decoder"] = Output("embedding", transposed=True)
        params.append(Param("decoder.bias", (V,), "embedding", np.s_[:, E], init.output_bias(V, H)))
    else:
        blocks.append(("decoder", (H + 1, V)))
        outputs["decoder"] = Output("decoder")
        params += [
            Param("decoder.weight", (H, V), "decoder", np.s_[:H], init.weight((H, V), H)),
            Param("decoder.bias", (V,), "decoder", np.s_[H], init.output_bias(V, H)),
        ]
    return Layout(blocks, params, outputs)


def _embedding(cfg, V, init, params, blocks):
    """The embedding's block: (V, E), or tied (V, E + 1) with the decoder's bias as its last column, or
    tied under the adaptive softmax (K + V, E + 1): the head's K cluster rows first and the embedding rows
    after them, so rows [0, K + c0) are the whole head [cluster rows; head words' rows] with the head bias
    as its extra column: one product.  That column is unused (zero) below the head words, unless the tails
    are tied too: then rows K + [c_i, c_{i+1}) with that column are tail cluster i."""
    E, init_embedding = cfg.emb_size, init.embedding((V, cfg.emb_size))
    if cfg.softmax == "adaptive" and cfg.tie_weights:
        K = len(cfg.adaptive_cutoffs)
        blocks.append(("embedding", (K + V, E + 1)))
        params.append(Param("embedding.weight", (V, E), "embedding", np.s_[K:, :E], init_embedding))
        return
    blocks.append(("embedding", (V, E + 1) if cfg.tie_weights else (V, E)))
    where = np.s_[:, :E] if cfg.tie_weights else np.s_[:]
    params.append(Param("embedding.weight", (V, E), "embedding", where, init_embedding))


def _adaptive_head(cfg, H, init, params, blocks, outputs):
    """The adaptive softmax's head (lmtrain/nn/adaptive.py has the equations): its own block, or tied, the
    first K + c_0 rows of the embedding block."""
    E, K, c0 = cfg.emb_size, len(cfg.adaptive_cutoffs), cfg.adaptive_cutoffs[0]
    bias = init.output_bias(K + c0, H)
    if cfg.tie_weights:  # the head's word rows are embedding rows; its cluster rows are its own
        outputs["head"] = Output("embedding", np.s_[: K + c0], transposed=True)
        params += [
            Param("adaptive.head.cluster_weight", (K, H), "embedding", np.s_[:K, :E], init.weight((K, H), H)),
            Param("adaptive.head.bias", (K + c0,), "embedding", np.s_[: K + c0, E], bias),
        ]
        return
    blocks.append(("adaptive.head", (H + 1, K + c0)))
    outputs["head"] = Output("adaptive.head")
    params += [
        Param("adaptive.head.weight", (H, K + c0), "adaptive.head", np.s_[:H], init.weight((H, K + c0), H)),
        Param("adaptive.head.bias", (K + c0,), "adaptive.head", np.s_[H], bias),
    ]


def _adaptive_tails(cfg, V, H, init, params, blocks, outputs):
    """The tail clusters: a projection and an output block each, or with tied tails their words' rows of
    the embedding block, scored straight from h."""
    E, cutoffs = cfg.emb_size, cfg.adaptive_cutoffs
    K, edges = len(cutoffs), list(cutoffs) + [V]  # tail cluster i holds the words [edges[i], edges[i + 1])
    for i, (d, n) in enumerate(tail_shapes(H, V, cutoffs, cfg.adaptive_div)):
        t = f"adaptive.tail.{i}"
        if cfg.adaptive_tie_tails:
            rows = np.s_[K + edges[i] : K + edges[i + 1]]
            outputs[f"tail.{i}"] = Output("embedding", rows, transposed=True)
            params.append(Param(t + ".bias", (n,), "embedding", (rows, E), init.output_bias(n, d)))
            continue
        blocks += [(t + ".proj", (H, d)), (t, (d + 1, n))]
        outputs[f"tail.{i}"] = Output(t)
        params += [
            Param(t + ".proj", (H, d), t + ".proj", np.s_[:], init.weight((H, d), H)),
            Param(t + ".weight", (d, n), t, np.s_[:d], init.weight((d, n), d)),
            Param(t + ".bias", (n,), t, np.s_[d], init.output_bias(n, d)),
        ]
