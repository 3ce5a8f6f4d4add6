"""Feed-forward layers with explicit forward and backward.

Every layer has ``params`` and ``grads``: dicts with the same keys whose arrays
have the same shapes.  ``forward`` keeps what ``backward`` needs; ``backward``
takes the gradient of the loss with respect to the layer's output, *writes*
the gradients of its parameters into ``grads`` and returns the gradient with
respect to its input.  Shapes are time-major: (T, B, ...) for a window of T
steps over B parallel streams.
"""

from typing import NamedTuple

import numpy as np

from lmtrain.backend import xp
from lmtrain.threads import parallel_rows


class Loss(NamedTuple):
    """What a loss layer's forward returns: the mean that backward differentiates, and the sums an
    evaluation adds up over windows (and ranks)."""

    mean: float  # total / max(divisor or count, 1)
    total: float  # summed (weighted) negative log-likelihood of the targets
    count: float  # summed weight: the targets counted


def row_buffer(buf, n, cols, dtype, new=xp.empty):
    """``buf`` when it has at least ``n`` rows of ``cols`` columns of ``dtype``, else ``new((n, cols), dtype)``.

    Layers keep their large buffers from call to call (a fresh (N, V) array each step costs page
    faults) and read the first N rows, so a row count that varies (a tail cluster of the adaptive
    softmax, the last window of an evaluation) does not reallocate them.
    """
    if buf is None or buf.shape[0] < n or buf.shape[1] != cols or buf.dtype != dtype:
        return new((n, cols), dtype)
    return buf


def keep_mask(rng, shape, p, dtype):
    """Inverted dropout's mask of ``shape``: 1 / (1 - p) where a uniform draw falls under 1 - p, else 0.

    Drawn in the activations' dtype: a float64 mask would double the traffic."""
    keep = 1.0 - p
    mask = (rng.random(shape, dtype=dtype) < keep).astype(dtype)
    mask *= mask.dtype.type(1.0 / keep)
    return mask


class Embedding:
    """ids (T, B) -> vectors (T, B, E): row ``ids[t, b]`` of ``weight`` (V, E).

    ``word_drop`` > 0 is embedding dropout (Gal & Ghahramani 2016, as in
    AWD-LSTM): each training forward pass removes whole word types, every
    occurrence of a dropped word in the window reading a zero vector, and
    scales the kept ones by 1/(1-p).

    ``products`` (every layer has it) lists the matrix products of a window, for ``lmtrain bench``: the
    embedding makes none.
    """

    def __init__(self, weight, grad=None, word_drop=0.0, rng=None):
        self.params = {"weight": weight}
        self.grads = {"weight": xp.zeros_like(weight) if grad is None else grad}
        # With tied weights the decoder writes the gradient of the first rows (all of them under the
        # full softmax, the head's words under the adaptive one) and the embedding adds to it; the
        # rows after them are zeroed first (see LanguageModel).
        self.rows_written = 0
        self.word_drop = float(word_drop)
        self.rng = rng
        self.frozen = False
        self.scale = None  # (T, B, 1) per-occurrence factor of this pass, or None
        self.word_mask = None  # (V,) scaled keep-mask over word types
        self.ids = None

    def forward(self, ids, train=False):
        self.ids = ids
        out = self.params["weight"][ids]
        if not (train and self.word_drop > 0):
            self.scale = None
            return out
        W = self.params["weight"]
        if not (self.frozen and self.word_mask is not None):
            self.word_mask = keep_mask(self.rng, W.shape[0], self.word_drop, W.dtype)
        self.scale = self.word_mask[ids][..., None]
        out *= self.scale
        return out

    def backward(self, dout):
        if self.scale is not None:
            dout = dout * self.scale
        grad = self.grads["weight"]
        grad[self.rows_written :].fill(0)
        E = grad.shape[1]
        # Common words repeat within a window, so rows must be summed, not
        # assigned: sort the ids once and add each run of equal ids with one
        # reduction (about twice as fast as numpy.add.at).
        ids = self.ids.reshape(-1)
        order = xp.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = xp.flatnonzero(xp.concatenate([xp.ones(1, bool), sorted_ids[1:] != sorted_ids[:-1]]))
        grad[sorted_ids[starts]] += xp.add.reduceat(dout.reshape(-1, E)[order], starts, axis=0)
        return None

    def products(self, rows, backward=True):
        return []


class Linear:
    """x (N, I) -> x W + b, computed as [x, 1] @ [W; b] with W and b stored as one block.

    ``block`` is (I + 1, O): rows 0..I-1 are W, row I is b.  With
    ``transposed=True`` the block is (O, I + 1) (the tied decoder: the
    embedding matrix with the bias as an extra column) and the layer computes
    [x, 1] @ block^T.  Either way the bias costs no separate pass over the
    (N, O) output, and its gradient comes out of the weight-gradient product.
    """

    def __init__(self, block, grad_block=None, transposed=False):
        self.transposed = transposed
        self.block = block
        self.grad_block = grad_block = xp.zeros_like(block) if grad_block is None else grad_block
        if transposed:
            self.params = {"weight": block[:, :-1], "bias": block[:, -1]}
            self.grads = {"weight": grad_block[:, :-1], "bias": grad_block[:, -1]}
        else:
            self.params = {"weight": block[:-1], "bias": block[-1]}
            self.grads = {"weight": grad_block[:-1], "bias": grad_block[-1]}
        self.x1 = self.x1_buf = self.out_buf = None

    def forward(self, x):
        N, I = x.shape
        O = self.block.shape[0] if self.transposed else self.block.shape[1]
        self.x1_buf = row_buffer(self.x1_buf, N, I + 1, x.dtype, xp.ones)  # [x, 1]: the ones column is written once
        self.out_buf = row_buffer(self.out_buf, N, O, x.dtype)
        self.x1 = self.x1_buf[:N]
        self.x1[:, :I] = x
        return xp.matmul(self.x1, self.block.T if self.transposed else self.block, out=self.out_buf[:N])

    def affine(self, x):
        """x W + b in a new array, leaving the buffers ``backward`` reads untouched."""
        W, b = self.params["weight"], self.params["bias"]
        return (x @ W.T if self.transposed else x @ W) + b

    def backward(self, dout):
        if self.transposed:
            xp.matmul(dout.T, self.x1, out=self.grad_block)
            return dout @ self.params["weight"]
        # [x, 1]^T copied contiguous (it is small): BLAS runs this product faster than on the strided view
        # (product_ways in lmtrain/bench.py times both layouts)
        xp.matmul(xp.ascontiguousarray(self.x1.T), dout, out=self.grad_block)
        return dout @ self.params["weight"].T

    def products(self, rows, backward=True, names=("[h, 1] W", "dW", "dlogits W^T"), where="(window)"):
        """(name, m, k, n, count) of the products of ``rows`` rows: forward, and with ``backward`` the
        weight gradient and the input gradient (``names`` label them, ``where`` says over what)."""
        I, O = (
            (self.block.shape[1] - 1, self.block.shape[0])
            if self.transposed
            else (self.block.shape[0] - 1, self.block.shape[1])
        )
        out = [(f"{names[0]} {where}", rows, I + 1, O, 1)]
        if backward:
            out += [
                (f"{names[1]} {where}", O, rows, I + 1, 1)
                if self.transposed
                else (f"{names[1]} {where}", I + 1, rows, O, 1),
                (f"{names[2]} {where}", rows, O, I, 1),
            ]
        return out


class Dropout:
    """Inverted dropout: zero with probability p, scale the kept values by 1/(1-p).

    ``locked=False``: a fresh mask for every element.  ``locked=True``
    (variational dropout, Gal & Ghahramani 2016): one mask per sequence per
    window, shape (1, B, D), shared by every time step, so a unit dropped
    for a stream stays dropped for the whole window.  ``frozen`` reuses the
    last mask, so a gradient check can perturb parameters while the noise
    stays fixed.
    """

    def __init__(self, p, rng, locked=False):
        self.p = float(p)
        self.rng = rng
        self.locked = locked
        self.mask = None
        self.frozen = False
        self.params, self.grads = {}, {}

    def forward(self, x, train):
        if not train or self.p == 0.0:
            self.mask = None
            return x
        shape = (1,) + x.shape[1:] if self.locked else x.shape
        if not (self.frozen and self.mask is not None and self.mask.shape == shape):
            self.mask = keep_mask(self.rng, shape, self.p, x.dtype)
        return x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask

    def products(self, rows, backward=True):
        return []


class SoftmaxCrossEntropy:
    """Mean negative log-likelihood of integer targets under softmax(logits).

    ``weights`` (same shape as the targets) lets evaluation skip padded
    positions: the loss is sum(w * nll) / sum(w).

    The usual recipe subtracts each row's maximum before exponentiating, one
    more pass over the (N, V) logits.  Here exp runs on the logits as they
    are, which is exact whenever no logit exceeds ~88 (float32 overflow) and
    the row is not vanishingly small; a row where either happens (its sum is
    infinite or below 1e-30) is redone with its maximum subtracted.  With the
    division by the sum deferred to backward, where it joins the 1/N
    scaling, training makes three passes over the logits (exp, sum, scale)
    instead of seven, and evaluation two; each is split over threads.
    """

    TINY = 1e-30

    def __init__(self):
        self.params, self.grads = {}, {}
        self.exps = self.exps_buf = None

    def forward(self, logits, targets, weights=None, divisor=None, grad=True):
        """Returns a ``Loss``; keeps exp(logits) for backward.

        ``divisor``, when given, replaces the summed weight as the divisor of the mean (the adaptive
        softmax divides each tail cluster's NLL by the count of all the window's targets).  ``grad``
        says whether a backward follows; this layer keeps what backward needs either way.
        """
        N, V = logits.shape
        t = targets.reshape(-1).astype(np.intp)
        self.exps_buf = row_buffer(self.exps_buf, N, V, logits.dtype)
        self.exps = exps = self.exps_buf[:N]
        sums = xp.empty(N, logits.dtype)

        def exp_and_sum(a, b):
            with np.errstate(over="ignore", under="ignore"):
                xp.exp(logits[a:b], out=exps[a:b])
            exps[a:b].sum(axis=1, out=sums[a:b])

        parallel_rows(exp_and_sum, N, V)

        shift = xp.zeros(N, logits.dtype)
        redo = xp.flatnonzero(~(sums > self.TINY) | ~xp.isfinite(sums))
        if len(redo):  # rare: overflow or underflow; the stable recipe for those rows only
            shift[redo] = logits[redo].max(axis=1)
            exps[redo] = xp.exp(logits[redo] - shift[redo, None])
            sums[redo] = exps[redo].sum(axis=1)
        nll = xp.log(sums) + (shift - logits[xp.arange(N), t])  # (shift - logit) first: both may be large
        self.sums, self.targets = sums, t
        return self.sum_up(nll, weights, divisor)

    @staticmethod
    def divisor_of(w, divisor, N):
        """What the summed loss is divided by: ``divisor`` if given, else the summed weight (at least 1)."""
        if divisor is not None:
            return max(divisor, 1.0)
        return max(float(N) if w is None else float(w.sum(dtype=np.float64)), 1.0)

    def sum_up(self, nll, weights, divisor):
        """The ``Loss`` of the rows' NLLs; keeps the weights and the divisor for backward, and the NLLs."""
        N = len(nll)
        self.nll = nll
        if weights is None:
            self.weights = None
            total, count = float(nll.sum(dtype=np.float64)), float(N)
        else:
            w = weights.reshape(-1).astype(nll.dtype)
            self.weights = w
            count = float(w.sum(dtype=np.float64))
            total = float((nll * w).sum(dtype=np.float64))
        self.count = self.divisor_of(self.weights, divisor, N)
        return Loss(total / self.count, total, count)

    def row_nll(self):
        """-log p(target) of each row of the last forward (unweighted): what scoring text reads."""
        return self.nll

    def backward(self):
        """d loss / d logits = (softmax - onehot) * w / count, written over the kept exp buffer."""
        d = self.exps
        w = self.weights
        scale = (1.0 / (self.sums * self.count)).astype(d.dtype)
        if w is not None:
            scale *= w
        parallel_rows(lambda a, b: xp.multiply(d[a:b], scale[a:b, None], out=d[a:b]), *d.shape)
        d[xp.arange(len(self.targets)), self.targets] -= (1.0 / self.count) if w is None else w / self.count
        return d

    def products(self, rows, backward=True):
        return []
