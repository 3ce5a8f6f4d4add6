"""Feed-forward layers with explicit forward and backward.

Every layer has ``params`` and ``grads``: dicts with the same keys whose arrays
have the same shapes.  ``forward`` keeps what ``backward`` needs; ``backward``
takes the gradient of the loss with respect to the layer's output, *writes*
the gradients of its parameters into ``grads`` and returns the gradient with
respect to its input.  Shapes are time-major: (T, B, ...) for a window of T
steps over B parallel streams.
"""
from lmtrain.backend import xp


class Embedding:
    """ids (T, B) -> vectors (T, B, E): row ``ids[t, b]`` of ``weight`` (V, E)."""

    def __init__(self, weight):
        self.params = {"weight": weight}
        self.grads = {"weight": xp.zeros_like(weight)}
        # With tied weights the decoder writes its part of this gradient first
        # and the embedding adds to it (see LanguageModel).
        self.accumulate = False
        self.ids = None

    def forward(self, ids):
        self.ids = ids
        return self.params["weight"][ids]

    def backward(self, dout):
        grad = self.grads["weight"]
        if not self.accumulate:
            grad.fill(0)
        E = grad.shape[1]
        # Rows repeat (common words), so the scatter must add, not assign.
        xp.add.at(grad, self.ids.reshape(-1), dout.reshape(-1, E))
        return None


class Linear:
    """x (N, I) -> x W + b, W (I, O).

    With ``transposed=True`` the layer stores W as (O, I) and computes
    x W^T + b: that is the decoder sharing the (V, E) embedding matrix.
    """

    def __init__(self, weight, bias, transposed=False):
        self.transposed = transposed
        self.params = {"weight": weight, "bias": bias}
        self.grads = {"weight": xp.zeros_like(weight), "bias": xp.zeros_like(bias)}
        self.x = None

    def forward(self, x):
        self.x = x
        W = self.params["weight"]
        out = x @ (W.T if self.transposed else W)
        out += self.params["bias"]
        return out

    def backward(self, dout):
        W, x = self.params["weight"], self.x
        if self.transposed:
            xp.matmul(dout.T, x, out=self.grads["weight"])
            dx = dout @ W
        else:
            xp.matmul(x.T, dout, out=self.grads["weight"])
            dx = dout @ W.T
        dout.sum(axis=0, out=self.grads["bias"])
        return dx


class Dropout:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    ``frozen`` reuses the last mask, so a gradient check can perturb
    parameters while the noise stays fixed.
    """

    def __init__(self, p, rng):
        self.p = float(p)
        self.rng = rng
        self.mask = None
        self.frozen = False
        self.params, self.grads = {}, {}

    def forward(self, x, train):
        if not train or self.p == 0.0:
            self.mask = None
            return x
        if not (self.frozen and self.mask is not None and self.mask.shape == x.shape):
            keep = 1.0 - self.p
            # Sample in the activations' dtype: a float64 mask would double the traffic.
            self.mask = (self.rng.random(x.shape, dtype=x.dtype) < keep).astype(x.dtype)
            self.mask *= x.dtype.type(1.0 / keep)
        return x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask


class SoftmaxCrossEntropy:
    """Mean negative log-likelihood of integer targets under softmax(logits).

    ``weights`` (same shape as the targets) lets evaluation skip padded
    positions: the loss is sum(w * nll) / sum(w).  The softmax is computed in
    place in the logits buffer, which this layer then owns until backward.
    """

    def __init__(self):
        self.params, self.grads = {}, {}
        self.probs = None

    def forward(self, logits, targets, weights=None):
        """Returns (mean loss, summed loss, summed weight)."""
        N = logits.shape[0]
        t = targets.reshape(-1)
        rows = xp.arange(N)
        logits -= logits.max(axis=1, keepdims=True)
        target_logit = logits[rows, t].copy()
        xp.exp(logits, out=logits)
        total = logits.sum(axis=1)
        nll = xp.log(total) - target_logit
        logits /= total[:, None]
        self.probs, self.targets, self.rows = logits, t, rows
        if weights is None:
            self.scale = 1.0 / N
            self.weights = None
            loss_sum, count = float(nll.sum()), float(N)
        else:
            w = weights.reshape(-1).astype(logits.dtype)
            count = float(w.sum())
            self.weights = w
            self.scale = 1.0 / max(count, 1.0)
            loss_sum = float((nll * w).sum())
        return loss_sum / max(count, 1.0), loss_sum, count

    def backward(self):
        d = self.probs
        d[self.rows, self.targets] -= 1.0
        if self.weights is not None:
            d *= self.weights[:, None]
        d *= d.dtype.type(self.scale)
        self.probs = None
        return d
