"""The adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs").

The vocabulary is ordered by frequency, and cut at ``cutoffs`` c_0 < c_1 < ...
< c_{K-1} < V into a head, the words [0, c_0), and K tail clusters, cluster i
holding the words [c_i, c_{i+1}) (with c_K = V).  For one row h (the last
layer's output, d units):

    head     s   = [h, 1] @ A                     (K + c_0 scores: column i < K stands for
                                                  tail cluster i, column K + w for word w < c_0)
    tail i   z_i = [h P_i, 1] @ T_i               (c_{i+1} - c_i scores; P_i is d x d_i, with
                                                  d_i = max(1, d // div^(i+1)))

    log p(w) = log softmax(s)[K + w]                                 if w < c_0
    log p(w) = log softmax(s)[i] + log softmax(z_i)[w - c_i]         if c_i <= w < c_{i+1}

so the probabilities of all V words sum to 1 exactly: the head shares its
mass between its words and the clusters, each cluster shares its entry's
mass among its words.  The training loss is the mean of -log p(target),
weighted as SoftmaxCrossEntropy weights it: sum_n w_n (-log p(t_n)) / sum_n w_n.

Where the speed comes from: every row goes through the head (d x (K + c_0)
instead of d x V), but only the rows whose target falls in cluster i go
through P_i and T_i, and the rare clusters are reached through small
projections.  No (N, V) array is ever formed on the training path; the full
table of log-probabilities (``log_probs``) is for generation and the probes.

Backward, with g_n = w_n / sum(w) per row and R_i the rows of cluster i:

    ds   = g * (softmax(s) - onehot(head target))     dA = [h, 1]^T ds     dh  = ds A[:d]^T
    dz_i = g * (softmax(z_i) - onehot(t - c_i))       dT_i = [u_i, 1]^T dz_i   (u_i = h[R_i] P_i)
    du_i = dz_i T_i[:d_i]^T                           dP_i = h[R_i]^T du_i     dh[R_i] += du_i P_i^T

The head and every cluster are a ``Linear`` followed by a
``SoftmaxCrossEntropy``: the same products, buffers and softmax passes as the
full softmax, on fewer columns (and, in the tails, fewer rows).

Tied tails (``model.adaptive_tie_tails``, with tied weights and div 1): P_i is
the identity (u_i = h[R_i], no projection) and T_i's word columns are the
embedding rows of the cluster's words, so the model has exactly the tied full
softmax's parameters (plus K cluster rows) and only the two-level
factorisation differs from it.
"""

import numpy as np

from lmtrain.backend import xp
from lmtrain.errors import ConfigError
from lmtrain.nn.layers import Loss, SoftmaxCrossEntropy


def tail_shapes(hidden, vocab_size, cutoffs, div):
    """[(projection units d_i, words in the cluster)] of each tail cluster."""
    edges = list(cutoffs) + [vocab_size]
    return [(max(1, int(hidden // div ** (i + 1))), edges[i + 1] - edges[i]) for i in range(len(cutoffs))]


def check_cutoffs(cutoffs, vocab_size):
    """The config checks the cutoffs on their own; here they meet the vocabulary, when the model is built."""
    if cutoffs[-1] >= vocab_size:
        raise ConfigError(
            f"model.adaptive_cutoffs {list(cutoffs)}: every cutoff must be below the vocabulary "
            f"size, {vocab_size:,} words ({cutoffs[-1]} would leave the last tail cluster empty)"
        )


def project(h, P):
    """u_i = h P_i, or h itself for a tied tail (P_i is None: no projection)."""
    return h if P is None else h @ P


def log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - (m + xp.log(xp.exp(z - m).sum(axis=1, keepdims=True)))


class AdaptiveSoftmax:
    """Loss layer over the hidden rows (N, d): ``forward(h, targets, weights)`` and ``backward()`` as
    SoftmaxCrossEntropy, with parameters of its own; ``log_probs(h)`` is the exact (N, V) table.

    ``head`` is a Linear from [h, 1] to the K + c_0 head scores (transposed when its word rows are
    the embedding's, see LanguageModel); ``tails`` holds, per cluster, its projection P_i (d, d_i),
    the gradient array of P_i and a Linear from [u, 1] to the cluster's words (P_i and its gradient
    None for a tied tail, whose Linear is transposed over embedding rows).  ``loss`` is the softmax
    cross-entropy class of the head and of every cluster.
    """

    def __init__(self, cutoffs, vocab_size, head, tails, loss=SoftmaxCrossEntropy):
        self.cutoffs = list(cutoffs)
        self.K = len(cutoffs)
        self.edges = self.cutoffs + [vocab_size]  # tail cluster i covers [edges[i], edges[i + 1])
        self.head = head
        self.projs = [p for p, _, _ in tails]
        self.proj_grads = [g for _, g, _ in tails]
        self.outs = [out for _, _, out in tails]
        self.head_loss = loss()
        self.tail_losses = [loss() for _ in tails]
        self.params = {"head.weight": head.params["weight"], "head.bias": head.params["bias"]}
        self.grads = {"head.weight": head.grads["weight"], "head.bias": head.grads["bias"]}
        for i, (P, dP, out) in enumerate(tails):
            self.params.update({f"tail.{i}.weight": out.params["weight"], f"tail.{i}.bias": out.params["bias"]})
            self.grads.update({f"tail.{i}.weight": out.grads["weight"], f"tail.{i}.bias": out.grads["bias"]})
            if P is not None:
                self.params[f"tail.{i}.proj"], self.grads[f"tail.{i}.proj"] = P, dP

    def forward(self, h, targets, weights=None, grad=True):
        """Returns the ``Loss`` of ``targets`` given the rows ``h``, exactly: -log p(t) = head NLL of t's
        head column + (for a tail word) its NLL within its cluster."""
        t = targets.reshape(-1).astype(np.intp)
        w = None if weights is None else weights.reshape(-1)
        # 0 for a head word, i + 1 for a word of tail cluster i
        where = xp.searchsorted(xp.asarray(self.edges), t, side="right")
        # the head column of each target: its own (K + t) or its cluster's (i)
        head_targets = xp.where(where == 0, t + self.K, where - 1)
        s = self.head.forward(h)  # s = [h, 1] A
        _, loss_sum, count = self.head_loss.forward(s, head_targets, weights, grad=grad)
        self.rows, self.h_rows = [], []
        for i, (P, out, loss) in enumerate(zip(self.projs, self.outs, self.tail_losses)):
            rows = xp.flatnonzero(where == i + 1)  # R_i
            h_rows = h[rows]
            self.rows.append(rows)
            self.h_rows.append(h_rows)
            if len(rows):
                z = out.forward(project(h_rows, P))  # z_i = [h P_i, 1] T_i, rows R_i only
                _, tail_sum, _ = loss.forward(
                    z, t[rows] - self.edges[i], None if w is None else w[rows], divisor=count, grad=grad
                )  # -log softmax(z_i)[t - c_i]
                loss_sum += tail_sum
        self.count = max(count, 1.0)
        return Loss(loss_sum / self.count, loss_sum, count)

    def row_nll(self):
        """-log p(target) of each row of the last forward: the head's, plus for a tail word its cluster's."""
        nll = self.head_loss.row_nll().astype(xp.float64)
        for rows, loss in zip(self.rows, self.tail_losses):
            if len(rows):
                nll[rows] += loss.row_nll()
        return nll

    def backward(self):
        """Writes the gradients of every parameter; returns d loss / d h (N, d), a new array."""
        dh = self.head.backward(self.head_loss.backward())  # ds -> dA, dh = ds A[:d]^T
        for P, dP, out, loss, rows, h_rows in zip(
            self.projs, self.proj_grads, self.outs, self.tail_losses, self.rows, self.h_rows
        ):
            if not len(rows):  # no target in this cluster: its parameters get no gradient
                if P is not None:
                    dP.fill(0)
                out.grad_block.fill(0)
                continue
            du = out.backward(loss.backward())  # dz_i -> dT_i, du_i = dz_i T_i[:d_i]^T
            if P is not None:  # (a tied tail has u_i = h[R_i]: du_i is dh[R_i]'s part)
                xp.matmul(h_rows.T, du, out=dP)  # dP_i = h[R_i]^T du_i
                du = du @ P.T  # du_i P_i^T
            dh[rows] += du
        return dh

    def products(self, rows, backward=True, tail_rows=None):
        """(name, m, k, n, count) of a window's products: the head on all ``rows`` rows, each tail
        cluster's projection and output on its rows only (``tail_rows``: the mean number of targets per
        window in each cluster; none when it gets none)."""
        out = self.head.products(rows, backward, names=("head [h, 1] A", "head dA", "head ds A^T"))
        for i, (P, lin, n) in enumerate(zip(self.projs, self.outs, tail_rows)):
            n = max(1, round(n)) if n > 0 else 0
            if not n:
                continue
            t = f"tail {i}"
            if P is None:  # tied: no projection; T_i is embedding rows, as the tied decoder
                out += lin.products(n, backward, (f"{t} [h, 1] T", f"{t} dT", f"{t} dz T^T"), "(its rows)")
                continue
            (H, d), (fwd, *bwd) = (
                P.shape,
                lin.products(n, backward, (f"{t} [u, 1] T", f"{t} dT", f"{t} dz T^T"), "(its rows)"),
            )
            out += [(f"{t} h P (its rows)", n, H, d, 1), fwd]
            if backward:
                out += bwd + [(f"{t} dP (its rows)", H, n, d, 1), (f"{t} du P^T (its rows)", n, d, H, 1)]
        return out

    def log_probs(self, h):
        """(N, V) exact log-probabilities of every word, in word order (the module docstring's
        equations over all rows and all clusters).  Leaves the buffers ``backward`` reads untouched."""
        head = log_softmax(self.head.affine(h))
        out = xp.empty((len(h), self.edges[-1]), h.dtype)
        out[:, : self.cutoffs[0]] = head[:, self.K :]
        for i, (P, tail) in enumerate(zip(self.projs, self.outs)):
            out[:, self.edges[i] : self.edges[i + 1]] = log_softmax(tail.affine(project(h, P))) + head[:, i : i + 1]
        return out
