"""Recurrent cells (one time step) and the layer that unrolls them over a window.

The LSTM, with the four gate pre-activations from one fused product::

    a = x W_x + h_{t-1} W_h + b            (B, 4H), blocks in the order f, i, o, g
    f, i, o = sigmoid(a_f), sigmoid(a_i), sigmoid(a_o)
    g = tanh(a_g)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

The cell path c_{t-1} -> c_t is one element-wise product with a different f
each step, so its gradient neither passes through W_h nor through a squashing
nonlinearity: that is why it survives across many steps.

``Recurrent`` splits the work the way the math allows: the input part
``x W_x + b`` of every step and every weight gradient are single products over
the whole window; only ``h_{t-1} W_h`` and the element-wise cell run per step.
"""
from lmtrain.backend import xp


def sigmoid_(a):
    """In-place logistic function, written with tanh so large |a| cannot overflow."""
    a *= 0.5
    xp.tanh(a, out=a)
    a += 1.0
    a *= 0.5
    return a


class LSTMCell:
    """One LSTM step.  ``state`` is the tuple (h, c); gates are ordered f, i, o, g."""

    gates = 4
    state_names = ("h", "c")

    def __init__(self, hidden_size):
        self.H = hidden_size

    def step_forward(self, a, c_prev, out_c, out_tanh_c, out_h):
        """``a`` (B, 4H) holds the full pre-activations; turned into activations in place."""
        H = self.H
        sigmoid_(a[:, :3 * H])
        xp.tanh(a[:, 3 * H:], out=a[:, 3 * H:])
        f, i, o, g = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        xp.multiply(f, c_prev, out=out_c)
        out_c += i * g
        xp.tanh(out_c, out=out_tanh_c)
        xp.multiply(o, out_tanh_c, out=out_h)

    def step_backward(self, act, c_prev, tanh_c, dh, dc, out_da):
        """Gradient of the pre-activations (into ``out_da``) and of c_{t-1}.

        ``act`` are the step's gate activations, ``dh`` and ``dc`` the
        gradients arriving at h_t and c_t (``dc`` is modified).
        """
        H = self.H
        f, i, o, g = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
        do = dh * tanh_c
        # dc += dh * o * (1 - tanh(c)^2)
        dtc = dh * o
        dtc *= 1.0 - tanh_c * tanh_c
        dc += dtc
        df, di, dg = out_da[:, :H], out_da[:, H:2 * H], out_da[:, 3 * H:]
        xp.multiply(dc, c_prev, out=df)
        xp.multiply(dc, g, out=di)
        xp.multiply(dc, i, out=dg)
        out_da[:, 2 * H:3 * H] = do
        # through the nonlinearities: sigmoid' = s (1 - s), tanh' = 1 - t^2
        s = act[:, :3 * H]
        out_da[:, :3 * H] *= s * (1.0 - s)
        out_da[:, 3 * H:] *= 1.0 - g * g
        return dc * f


class Recurrent:
    """A cell unrolled over a window: x (T, B, D) -> h (T, B, H).

    Parameters: ``weight_x`` (D, 4H), ``weight_h`` (H, 4H), ``bias`` (4H,).
    The state (h_0, c_0) comes in and (h_T, c_T) goes out, so consecutive
    windows continue one sequence; ``backward`` stops at the window's start
    (truncated BPTT) and returns the gradient with respect to (h_0, c_0).

    ``weight_drop`` > 0 is DropConnect on the recurrent weights (Wan et al.
    2013, as AWD-LSTM uses it): each training forward pass draws one mask
    over W_h, used at every step of the window.
    """

    def __init__(self, weight_x, weight_h, bias, grads=None, weight_drop=0.0, rng=None):
        H = weight_h.shape[0]
        self.cell = LSTMCell(H)
        self.H = H
        self.params = {"weight_x": weight_x, "weight_h": weight_h, "bias": bias}
        self.grads = grads if grads is not None else {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.weight_drop = float(weight_drop)
        self.rng = rng
        self.frozen = False      # reuse the current weight mask (gradient checks)
        self.wmask = None        # (H, 4H) scaled keep-mask of this forward pass, or None
        self._capacity = (0, None, None)

    def _buffers(self, T, B, dtype):
        """Views of length T into buffers the layer owns; they only grow, so varying T costs nothing."""
        if self._capacity[0] < T or self._capacity[1:] != (B, dtype):
            H, cap = self.H, max(T, self._capacity[0] if self._capacity[1:] == (B, dtype) else 0)
            self._act = xp.empty((cap, B, 4 * H), dtype)
            self._h = xp.empty((cap + 1, B, H), dtype)
            self._c = xp.empty((cap + 1, B, H), dtype)
            self._tanh_c = xp.empty((cap, B, H), dtype)
            self._dact = xp.empty((cap, B, 4 * H), dtype)
            self._capacity = (cap, B, dtype)
        self.act, self.h, self.c = self._act[:T], self._h[:T + 1], self._c[:T + 1]
        self.tanh_c, self.dact = self._tanh_c[:T], self._dact[:T]

    def recurrent_weight(self, train):
        """W_h as this pass uses it: with a fresh DropConnect mask when training with weight_drop."""
        Wh = self.params["weight_h"]
        if not (train and self.weight_drop > 0):
            self.wmask = None
            return Wh
        if not (self.frozen and self.wmask is not None):
            keep = 1.0 - self.weight_drop
            self.wmask = (self.rng.random(Wh.shape, dtype=Wh.dtype) < keep).astype(Wh.dtype)
            self.wmask *= Wh.dtype.type(1.0 / keep)
        return Wh * self.wmask

    def forward(self, x, state, train=False):
        T, B, D = x.shape
        H = self.H
        Wx, b = self.params["weight_x"], self.params["bias"]
        self.Wh = Wh = self.recurrent_weight(train)
        self._buffers(T, B, x.dtype)
        self.x = x
        act, h, c = self.act, self.h, self.c
        h[0], c[0] = state
        xp.matmul(x.reshape(T * B, D), Wx, out=act.reshape(T * B, 4 * H))
        act += b
        for t in range(T):
            act[t] += h[t] @ Wh
            self.cell.step_forward(act[t], c[t], c[t + 1], self.tanh_c[t], h[t + 1])
        return h[1:], (h[T].copy(), c[T].copy())

    def backward(self, dh_out, dstate=None):
        """``dh_out`` (T, B, H): gradient at every output; ``dstate``: at (h_T, c_T)."""
        T, B, H = dh_out.shape
        D = self.x.shape[2]
        Wx = self.params["weight_x"]
        # A contiguous W_h^T: BLAS multiplies by it about twice as fast as by the transposed view.
        WhT = xp.ascontiguousarray(self.Wh.T)
        dact = self.dact
        if dstate is None:
            dh_next = xp.zeros((B, H), dh_out.dtype)
            dc = xp.zeros((B, H), dh_out.dtype)
        else:
            dh_next, dc = dstate[0].copy(), dstate[1].copy()
        for t in reversed(range(T)):
            dh = dh_out[t] + dh_next
            dc = self.cell.step_backward(self.act[t], self.c[t], self.tanh_c[t], dh, dc, dact[t])
            dh_next = dact[t] @ WhT
        da2 = dact.reshape(T * B, 4 * H)
        xp.matmul(self.x.reshape(T * B, D).T, da2, out=self.grads["weight_x"])
        xp.matmul(self.h[:T].reshape(T * B, H).T, da2, out=self.grads["weight_h"])
        if self.wmask is not None:
            self.grads["weight_h"] *= self.wmask
        da2.sum(axis=0, out=self.grads["bias"])
        dx = (da2 @ Wx.T).reshape(T, B, D)
        return dx, (dh_next, dc)
