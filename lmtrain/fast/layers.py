"""The fast path's layers: the reference layers of lmtrain/nn/, with their element-wise work in the
compiled kernels of lmtrain/fast/kernels.py.

Each class here is a subclass of the reference layer it stands in for and
computes the same thing (tests/test_kernels.py holds them to it); what it
adds is where the time goes: kernels that make one pass over memory where
numpy makes one per operation, buffers kept from window to window (a fresh
(N, V) array each step costs page faults), and at small batches the time
step's products with W_h from a transposed copy of W_h (``StepProducts``).
"""

import numpy as np

from lmtrain import threads
from lmtrain.backend import xp
from lmtrain.fast import kernels as k
from lmtrain.nn import cells, layers
from lmtrain.nn.layers import row_buffer
from lmtrain.threads import parallel_rows


class Embedding(layers.Embedding):
    def backward(self, dout):
        """One compiled loop over the rows (``kernels.add_rows``) instead of the reference's sort."""
        if self.scale is not None:
            dout = dout * self.scale
        grad = self.grads["weight"]
        grad[self.rows_written :].fill(0)
        k.add_rows(grad, self.ids.reshape(-1), dout.reshape(-1, grad.shape[1]))
        return None


class SoftmaxCrossEntropy(layers.SoftmaxCrossEntropy):
    """The reference's recipe row by row (``kernels.softmax_rows``, ``kernels.nll_rows``): each row judged
    by its sum and redone shifted by its maximum where needed.  In training (``grad=True``) each row is
    scaled into its gradient while it is still in cache, so the (N, V) array makes one trip through memory,
    not two, and ``backward`` returns it; in evaluation nothing is kept, so there is no (N, V) buffer."""

    def forward(self, logits, targets, weights=None, divisor=None, grad=True):
        N, V = logits.shape
        dtype = logits.dtype
        t = targets.reshape(-1).astype(np.intp)
        nll = xp.empty(N, dtype)
        if not grad:
            self.exps = None
            parallel_rows(lambda a, b: k.nll_rows(logits[a:b], t[a:b], nll[a:b]), N, V)
            return self.sum_up(nll, weights, divisor)
        self.exps_buf = row_buffer(self.exps_buf, N, V, dtype)
        self.exps = exps = self.exps_buf[:N]
        w = None if weights is None else weights.reshape(-1).astype(dtype)
        count = self.divisor_of(w, divisor, N)
        row_w = xp.ones(N, dtype) if w is None else w
        at_target = xp.full(N, 1.0 / count, dtype) if w is None else w / dtype.type(count)
        parallel_rows(
            lambda a, b: k.softmax_rows(
                logits[a:b], t[a:b], row_w[a:b], dtype.type(count), at_target[a:b], exps[a:b], nll[a:b]
            ),
            N,
            V,
        )
        return self.sum_up(nll, weights, divisor)

    def backward(self):
        if self.exps is None:
            raise RuntimeError("backward after a forward with grad=False: no gradient was kept")
        return self.exps  # forward wrote the gradient already


def padded_width(n):
    """n rounded up to whole 16-float vectors: a dot product over rows padded with zeros has no scalar tail."""
    return -(-n // 16) * 16


class StepProducts:
    """The two products a time step makes with W_h: ``h_{t-1} W_h`` forward and ``d W_h^T`` backward.

    Every other product of a window is one large product over all its steps (``Recurrent``); these
    two are small, B rows (the batch) at a time.  At 2 <= B <= 20 ``kernels.matmul_t`` does them from
    W_h^T laid out once per window: OpenBLAS re-lays W_h out on every call, which at these sizes costs
    as much as the arithmetic (``lmtrain bench`` times both ways); beyond 20 rows BLAS is as fast or
    faster, at one row as fast.  The copy costs what the kernel saves in a few forward steps, so windows
    shorter than MIN_STEPS (generation's single steps) keep BLAS.  One per layer: it owns the copy, reused
    from window to window while the model's weights are held (``LanguageModel.weights_held``).  Where
    the kernel makes the products, the LSTM runs its whole loop in one kernel call
    (``kernels.lstm_window_forward``/``_backward``), which reads ``wt``, ``x`` and ``Wh`` from here.
    """

    ROWS = range(2, 21)
    MIN_STEPS = 4

    def __init__(self):
        self.Wh, self.kernel, self.wt, self.x = None, None, None, None
        self.kept = False  # ``wt`` holds the W_h of a window whose weights are held

    @classmethod
    def use_kernel(cls, B, T):
        """Whether a window of T steps at batch B goes to the kernel (else BLAS): not where OpenBLAS's
        threads spin long (lmtrain/threads.py), since OpenMP's threads would compete with them."""
        return B in cls.ROWS and T >= cls.MIN_STEPS and threads.SHORT_SPINS

    def load(self, Wh, B, T, held=False):
        """Use ``Wh`` (H, G*H) for the steps of a window of T steps at batch B.  ``held``: the weights
        have not changed since the previous window that was held too, so its copy serves."""
        self.Wh = Wh
        self.kernel = k if self.use_kernel(B, T) else None
        if self.kernel is None:
            return
        H, G = Wh.shape
        self.x = row_buffer(self.x, B, padded_width(H), Wh.dtype, xp.zeros)
        if held and self.kept and self.wt.shape == (G, padded_width(H)):
            return
        self.wt = row_buffer(self.wt, G, padded_width(H), Wh.dtype, xp.zeros)[:G]
        k.transpose_into(Wh, self.wt[:, :H])
        self.kept = held

    def times(self, h, out):
        """h W_h (B, G*H) into ``out``."""
        if self.kernel is None:
            return xp.matmul(h, self.Wh, out=out)
        B, H = h.shape
        x = self.x[:B]
        x[:, :H] = h
        k.matmul_t(x, self.wt, out)
        return out

    def out_t(self, B, dtype):
        """The buffer ``times_t`` writes into, one per backward pass: (B, H) for the kernel, (H, B) for BLAS,
        which computes d W_h^T as (W_h d^T)^T as the reference does."""
        H = self.Wh.shape[0]
        return xp.empty((B, H) if self.kernel is not None else (H, B), dtype)

    def times_t(self, d, out):
        """d W_h^T (B, H) into ``out`` (from ``out_t``); the result is ``out`` or a view of it."""
        if self.kernel is None:
            return xp.matmul(self.Wh, d.T, out=out).T
        k.matmul_t(d, self.Wh, out)
        return out


class Buffers:
    """Per-window arrays a cell owns; they grow with the window and are reused, never reallocated per step."""

    def __init__(self):
        self._cap = (0, None, None)
        self._arrays = {}

    def get(self, T, B, dtype, **widths):
        """Views of shape (T + extra, B, width) for name=(extra, width)."""
        if self._cap[0] < T or self._cap[1:] != (B, dtype):
            cap = max(T, self._cap[0] if self._cap[1:] == (B, dtype) else 0)
            self._arrays = {name: xp.empty((cap + extra, B, w), dtype) for name, (extra, w) in widths.items()}
            self._cap = (cap, B, dtype)
        return {name: a[: T + widths[name][0]] for name, a in self._arrays.items()}


class LSTMCell(cells.LSTMCell):
    """The reference's loop with each step one kernel call (``kernels.lstm_step_forward``/``_backward``),
    or, where the step products go to the kernel too, the whole loop one call."""

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        self.buf = Buffers()

    def forward(self, ax, state, wh, extra):
        """As the reference, with ``wh`` the layer's StepProducts."""
        T, B, _ = ax.shape
        H = self.H
        b = self.buf.get(T, B, ax.dtype, h=(1, H), c=(1, H), tanh_c=(0, H), dact=(0, 4 * H), u=(0, 4 * H))
        self.act, self.h, self.c, self.tanh_c, self.dact = ax, b["h"], b["c"], b["tanh_c"], b["dact"]
        h, c, u = self.h, self.c, b["u"]
        h[0], c[0] = state
        if wh.kernel is not None:
            k.lstm_window_forward(ax, u, c, self.tanh_c, h, wh.wt, wh.x[:B])
        else:
            for t in range(T):
                wh.times(h[t], u[t])
                k.lstm_step_forward(ax[t], u[t], c[t], c[t + 1], self.tanh_c[t], h[t + 1])
        return h, (h[T].copy(), c[T].copy())

    def backward(self, dh_out, dstate, wh, extra):
        T, B, H = dh_out.shape
        dact, dhT = self.dact, wh.out_t(B, dh_out.dtype)
        if dstate is None:
            dh_next, dc = xp.zeros((B, H), dh_out.dtype), xp.zeros((B, H), dh_out.dtype)
        else:
            dh_next, dc = dstate[0].copy(), dstate[1].copy()
        if wh.kernel is not None:
            k.lstm_window_backward(self.act, self.c, self.tanh_c, dh_out, dh_next, dc, dact, wh.Wh, dhT)
            dh_next = dhT
        else:
            for t in reversed(range(T)):  # dc becomes the gradient at c_{t-1} in place
                k.lstm_step_backward(self.act[t], self.c[t], self.tanh_c[t], dh_out[t], dh_next, dc, dact[t])
                dh_next = wh.times_t(dact[t], dhT)
        return dact, dact, (dh_next, dc), {}


class GRUCell(cells.GRUCell):
    """The reference's loop with each step's element-wise work one kernel call."""

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        self.buf = Buffers()

    def forward(self, ax, state, wh, extra):
        T, B, G = ax.shape
        H = self.H
        b = self.buf.get(T, B, ax.dtype, h=(1, H), un=(0, H), dax=(0, G), dah=(0, G), u=(0, G))
        self.act, self.h, self.un, self.dax, self.dah = ax, b["h"], b["un"], b["dax"], b["dah"]
        h, un, b_hn = self.h, self.un, extra["bias_h"]
        (h[0],) = state
        for t in range(T):
            u = wh.times(h[t], b["u"][t])
            k.gru_step_forward(ax[t], u, b_hn, h[t], un[t], h[t + 1])
        return h, (h[T].copy(),)

    def backward(self, dh_out, dstate, wh, extra):
        T, B, H = dh_out.shape
        act, h, un, dax, dah = self.act, self.h, self.un, self.dax, self.dah
        dhT = wh.out_t(B, dh_out.dtype)
        dh_next = xp.zeros((B, H), dh_out.dtype) if dstate is None else dstate[0].copy()
        # the gradient at h_t arrives in three parts: from the output, through z and through W_h
        dh_w = xp.zeros((B, H), dh_out.dtype)
        for t in reversed(range(T)):
            k.gru_step_backward(act[t], un[t], h[t], dh_out[t], dh_next, dh_w, dax[t], dah[t])
            dh_w = wh.times_t(dah[t], dhT)
        dh_next += dh_w
        return dax, dah, (dh_next,), {"bias_h": dah[:, :, 2 * H :].sum(axis=(0, 1))}


class RNNCell(cells.RNNCell):
    """The reference's loop with each step's element-wise work one kernel call."""

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        self.buf = Buffers()

    def forward(self, ax, state, wh, extra):
        T, B, _ = ax.shape
        b = self.buf.get(T, B, ax.dtype, h=(1, self.H), da=(0, self.H), u=(0, self.H))
        self.h, self.da = b["h"], b["da"]
        h = self.h
        (h[0],) = state
        for t in range(T):
            u = wh.times(h[t], b["u"][t])
            k.rnn_step_forward(ax[t], u, h[t + 1])
        return h, (h[T].copy(),)

    def backward(self, dh_out, dstate, wh, extra):
        T, B, H = dh_out.shape
        h, da = self.h, self.da
        dhT = wh.out_t(B, dh_out.dtype)
        dh_next = xp.zeros((B, H), dh_out.dtype) if dstate is None else dstate[0].copy()
        for t in reversed(range(T)):
            k.rnn_step_backward(h[t + 1], dh_out[t], dh_next, da[t])
            dh_next = wh.times_t(da[t], dhT)
        return da, da, (dh_next,), {}


class Recurrent(cells.Recurrent):
    """The reference layer with the fused cells, its time step's products through ``StepProducts``, and
    its input product into a buffer kept from window to window.  The gradient-flow probe's step hook
    reads the gradient at every step's state, which the kernels never form: the probe uses the reference."""

    cells = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = StepProducts()  # this window's W_h, in the form the per-step products read it
        self.held = False
        self._ax = Buffers()

    def hold_weights(self, held):
        if held != self.held:  # a copy made outside the promise is never reused inside it, nor after it
            self.steps.kept = False
        self.held = held

    def forward(self, x, state, train=False):
        T, B, D = x.shape
        Wx, b = self.params["weight_x"], self.params["bias"]
        G = Wx.shape[1]
        self.Wh = self.recurrent_weight(train)
        self.steps.load(self.Wh, B, T, held=self.held and not train)
        self.x = x
        ax = self._ax.get(T, B, x.dtype, ax=(0, G))["ax"]
        xp.matmul(x.reshape(T * B, D), Wx, out=ax.reshape(T * B, G))
        ax += b
        self.h, final = self.cell.forward(ax, state, self.steps, self.extra())
        return self.h[1:], final

    def backward(self, dh_out, dstate=None, step_hook=None):
        if step_hook is not None:
            raise ValueError(
                "step hooks need the reference layers (lmtrain.nn): the kernels keep no per-step gradients"
            )
        return self.window_gradients(*self.cell.backward(dh_out, dstate, self.steps, self.extra()))
