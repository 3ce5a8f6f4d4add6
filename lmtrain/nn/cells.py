"""Recurrent cells and the layer that unrolls them over a window.

The LSTM, with the four gate pre-activations from one fused product::

    a = x W_x + h_{t-1} W_h + b            (B, 4H), blocks in the order f, i, o, g
    f, i, o = sigmoid(a_f), sigmoid(a_i), sigmoid(a_o)
    g = tanh(a_g)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

The cell path c_{t-1} -> c_t is one element-wise product with a different f
each step, so its gradient neither passes through W_h nor through a squashing
nonlinearity: that is why it survives across many steps.  The GRU keeps a
gated additive path on h itself; the plain (Elman) RNN has only
h_t = tanh(x W_x + h_{t-1} W_h + b), so its gradient is multiplied by W_h and
tanh' at every step, and vanishes or explodes.

``Recurrent`` splits the work the way the math allows: the input part
``x W_x + b`` of every step and every weight gradient are single products over
the whole window; only ``h_{t-1} W_h`` and the element-wise cell run per step
(a cell's ``forward`` and ``backward`` run the loop over the window's steps).

This is the reference: what each step computes, in numpy.  lmtrain/fast/ has
the same layer with each step's element-wise work fused into compiled kernels.
"""

from lmtrain.backend import xp
from lmtrain.nn.layers import keep_mask


def sigmoid_(a):
    """In-place logistic function, written with tanh so large |a| cannot overflow."""
    a *= 0.5
    xp.tanh(a, out=a)
    a += 1.0
    a *= 0.5
    return a


def times_t(Wh, d):
    """d W_h^T, computed as (W_h d^T)^T: BLAS runs this form faster at a time step's shapes (few rows of
    d), and W_h needs no transposed copy.  ``lmtrain bench`` times both forms (product_ways)."""
    return xp.matmul(Wh, d.T).T


class Cell:
    """What a cell declares: ``gates`` blocks of H columns in W_x, W_h and b; the names of its state
    arrays; extra parameters beyond those three.  ``forward(ax, state, Wh, extra)`` runs a window from
    ax = x W_x + b; ``backward(dh_out, dstate, Wh, extra, step_hook)`` returns the gradients of ax and
    of h W_h (the same array where they coincide), of the initial state, and of the extras.
    ``step_hook(t, gradients)``, when given, sees the gradient arriving at each step's state (the
    gradient-flow probe)."""

    gates = 1
    state_names = ("h",)
    extra_params = {}

    def __init__(self, hidden_size):
        self.H = hidden_size


class LSTMCell(Cell):
    """Gates f, i, o, g; state (h, c)."""

    gates = 4
    state_names = ("h", "c")

    # -- one step -----------------------------------------------------------
    def step_forward(self, a, c_prev, out_c, out_tanh_c, out_h):
        """``a`` (B, 4H) holds the full pre-activations; turned into activations in place."""
        H = self.H
        sigmoid_(a[:, : 3 * H])
        xp.tanh(a[:, 3 * H :], out=a[:, 3 * H :])
        f, i, o, g = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
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
        f, i, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
        do = dh * tanh_c
        # dc += dh * o * (1 - tanh(c)^2)
        dtc = dh * o
        dtc *= 1.0 - tanh_c * tanh_c
        dc += dtc
        df, di, dg = out_da[:, :H], out_da[:, H : 2 * H], out_da[:, 3 * H :]
        xp.multiply(dc, c_prev, out=df)
        xp.multiply(dc, g, out=di)
        xp.multiply(dc, i, out=dg)
        out_da[:, 2 * H : 3 * H] = do
        # through the nonlinearities: sigmoid' = s (1 - s), tanh' = 1 - t^2
        s = act[:, : 3 * H]
        out_da[:, : 3 * H] *= s * (1.0 - s)
        out_da[:, 3 * H :] *= 1.0 - g * g
        return dc * f

    # -- one window -----------------------------------------------------------
    def forward(self, ax, state, Wh, extra):
        """``ax`` (T, B, 4H): x W_x + b, turned into gate activations in place.  Returns h (T+1, B, H)."""
        T, B, G = ax.shape
        H = self.H
        self.act = ax
        self.h, self.c = xp.empty((T + 1, B, H), ax.dtype), xp.empty((T + 1, B, H), ax.dtype)
        self.tanh_c = xp.empty((T, B, H), ax.dtype)
        h, c, u = self.h, self.c, xp.empty((T, B, G), ax.dtype)
        h[0], c[0] = state
        for t in range(T):
            xp.matmul(h[t], Wh, out=u[t])
            ax[t] += u[t]
            self.step_forward(ax[t], c[t], c[t + 1], self.tanh_c[t], h[t + 1])
        return h, (h[T].copy(), c[T].copy())

    def backward(self, dh_out, dstate, Wh, extra, step_hook=None):
        """For the LSTM the gradients of ax and of h W_h are one array."""
        T, B, H = dh_out.shape
        dact = xp.empty((T, B, 4 * H), dh_out.dtype)
        if dstate is None:
            dh_next, dc = xp.zeros((B, H), dh_out.dtype), xp.zeros((B, H), dh_out.dtype)
        else:
            dh_next, dc = dstate[0].copy(), dstate[1].copy()
        for t in reversed(range(T)):
            dh = dh_out[t] + dh_next
            dc_t = dc  # step_backward completes it in place: the whole gradient at c_t
            dc = self.step_backward(self.act[t], self.c[t], self.tanh_c[t], dh, dc, dact[t])
            if step_hook is not None:
                step_hook(t, {"h": dh.copy(), "c": dc_t.copy()})
            dh_next = times_t(Wh, dact[t])
        return dact, dact, (dh_next, dc), {}


class GRUCell(Cell):
    """Gates r, z, n (reset applied after the recurrent product, as cuDNN and PyTorch do); state (h,).

    r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z),  n = tanh(a_n + r * (u_n + b_hn))
    h_t = (1 - z) * n + z * h_{t-1}          with a = x W_x + b and u = h_{t-1} W_h
    """

    gates = 3
    extra_params = {"bias_h": lambda H: (H,)}  # b_hn: inside the reset product, so not mergeable into b

    def forward(self, ax, state, Wh, extra):
        T, B, G = ax.shape
        H = self.H
        self.act = ax
        self.h, self.un = xp.empty((T + 1, B, H), ax.dtype), xp.empty((T, B, H), ax.dtype)
        h, un, b_hn = self.h, self.un, extra["bias_h"]
        (h[0],) = state
        for t in range(T):
            u = xp.matmul(h[t], Wh)
            a = ax[t]
            a[:, : 2 * H] += u[:, : 2 * H]
            sigmoid_(a[:, : 2 * H])  # r, z
            xp.add(u[:, 2 * H :], b_hn, out=un[t])  # u_n + b_hn, kept for backward
            n = a[:, 2 * H :]
            n += a[:, :H] * un[t]
            xp.tanh(n, out=n)
            z = a[:, H : 2 * H]
            xp.subtract(h[t], n, out=h[t + 1])  # h_t = n + z (h_{t-1} - n)
            h[t + 1] *= z
            h[t + 1] += n
        return h, (h[T].copy(),)

    def backward(self, dh_out, dstate, Wh, extra, step_hook=None):
        T, B, H = dh_out.shape
        act, h, un = self.act, self.h, self.un
        dax, dah = xp.empty((T, B, 3 * H), dh_out.dtype), xp.empty((T, B, 3 * H), dh_out.dtype)
        dh_next = xp.zeros((B, H), dh_out.dtype) if dstate is None else dstate[0].copy()
        for t in reversed(range(T)):
            r, z, n = act[t, :, :H], act[t, :, H : 2 * H], act[t, :, 2 * H :]
            dh = dh_out[t] + dh_next
            dan = dh * (1.0 - z)
            dan *= 1.0 - n * n  # through tanh
            dax[t, :, 2 * H :] = dan
            xp.multiply(dan, r, out=dah[t, :, 2 * H :])  # d u_n
            dr = dan * un[t]
            dz = dh * (h[t] - n)
            dr *= r * (1.0 - r)
            dz *= z * (1.0 - z)
            dax[t, :, :H] = dr
            dax[t, :, H : 2 * H] = dz
            dah[t, :, : 2 * H] = dax[t, :, : 2 * H]
            if step_hook is not None:
                step_hook(t, {"h": dh.copy()})
            dh_next = dh * z
            dh_next += times_t(Wh, dah[t])
        return dax, dah, (dh_next,), {"bias_h": dah[:, :, 2 * H :].sum(axis=(0, 1))}


class RNNCell(Cell):
    """The plain (Elman) tanh RNN: h_t = tanh(x W_x + h_{t-1} W_h + b); state (h,)."""

    def forward(self, ax, state, Wh, extra):
        T, B, _ = ax.shape
        self.h = h = xp.empty((T + 1, B, self.H), ax.dtype)
        (h[0],) = state
        for t in range(T):
            ax[t] += xp.matmul(h[t], Wh)
            xp.tanh(ax[t], out=h[t + 1])
        return h, (h[T].copy(),)

    def backward(self, dh_out, dstate, Wh, extra, step_hook=None):
        T, B, H = dh_out.shape
        h, da = self.h, xp.empty((T, B, self.H), dh_out.dtype)
        dh_next = xp.zeros((B, H), dh_out.dtype) if dstate is None else dstate[0].copy()
        for t in reversed(range(T)):
            xp.add(dh_out[t], dh_next, out=da[t])
            if step_hook is not None:
                step_hook(t, {"h": da[t].copy()})
            da[t] *= 1.0 - h[t + 1] * h[t + 1]
            dh_next = times_t(Wh, da[t])
        return da, da, (dh_next,), {}


CELLS = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}


class Recurrent:
    """A cell unrolled over a window: x (T, B, D) -> h (T, B, H).

    Parameters: ``weight_x`` (D, G*H), ``weight_h`` (H, G*H), ``bias`` (G*H,)
    for a cell with G gate blocks, plus the cell's own extras (the GRU's
    ``bias_h``).  The state comes in and the final state goes out, so
    consecutive windows continue one sequence; ``backward`` stops at the
    window's start (truncated BPTT) and returns the gradient with respect to
    the initial state.

    ``weight_drop`` > 0 is DropConnect on the recurrent weights (Wan et al.
    2013, as AWD-LSTM uses it): each training forward pass draws one mask
    over W_h, used at every step of the window.
    """

    cells = CELLS

    def __init__(self, weight_x, weight_h, bias, grads=None, weight_drop=0.0, rng=None, cell="lstm", extra=None):
        H = weight_h.shape[0]
        self.cell = self.cells[cell](H)
        self.H = H
        self.params = {"weight_x": weight_x, "weight_h": weight_h, "bias": bias, **(extra or {})}
        for name, shape in self.cell.extra_params.items():
            if name not in self.params:
                self.params[name] = xp.zeros(shape(H), weight_h.dtype)
        self.grads = grads if grads is not None else {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.weight_drop = float(weight_drop)
        self.rng = rng
        self.frozen = False  # reuse the current weight mask (gradient checks)
        self.wmask = None  # (H, G*H) scaled keep-mask of this forward pass, or None

    def recurrent_weight(self, train):
        """W_h as this pass uses it: with a fresh DropConnect mask when training with weight_drop."""
        Wh = self.params["weight_h"]
        if not (train and self.weight_drop > 0):
            self.wmask = None
            return Wh
        if not (self.frozen and self.wmask is not None):
            self.wmask = keep_mask(self.rng, Wh.shape, self.weight_drop, Wh.dtype)
        return Wh * self.wmask

    def extra(self):
        """The cell's own parameters beyond W_x, W_h and b."""
        return {k: self.params[k] for k in self.cell.extra_params}

    def hold_weights(self, held):
        """``held``: a promise that no weight changes until it is withdrawn (an evaluation's windows), so
        what a forward derives from the weights may be kept for the next.  The reference keeps nothing."""

    def forward(self, x, state, train=False):
        T, B, D = x.shape
        Wx, b = self.params["weight_x"], self.params["bias"]
        self.Wh = self.recurrent_weight(train)
        self.x = x
        ax = xp.matmul(x.reshape(T * B, D), Wx).reshape(T, B, Wx.shape[1])
        ax += b
        self.h, final = self.cell.forward(ax, state, self.Wh, self.extra())
        return self.h[1:], final

    def backward(self, dh_out, dstate=None, step_hook=None):
        """``dh_out`` (T, B, H): gradient at every output; ``dstate``: at the final state.  ``step_hook``:
        see ``Cell``."""
        grads = self.cell.backward(dh_out, dstate, self.Wh, self.extra(), step_hook)
        return self.window_gradients(*grads)

    def window_gradients(self, dax, dah, dstate0, dextra):
        """From the cell's gradients, the weight gradients (one product each over the window) and the
        gradient of the input; returns (dx, gradient at the initial state)."""
        T, B, G = dax.shape
        D, H = self.x.shape[2], self.H
        Wx = self.params["weight_x"]
        dax2, dah2 = dax.reshape(T * B, G), dah.reshape(T * B, G)
        xp.matmul(self.x.reshape(T * B, D).T, dax2, out=self.grads["weight_x"])
        xp.matmul(self.h[:T].reshape(T * B, H).T, dah2, out=self.grads["weight_h"])
        if self.wmask is not None:
            self.grads["weight_h"] *= self.wmask
        dax2.sum(axis=0, out=self.grads["bias"])
        for name, g in dextra.items():
            self.grads[name][...] = g
        dx = (dax2 @ Wx.T).reshape(T, B, D)
        return dx, dstate0

    def products(self, rows, steps, backward=True):
        """(name, m, k, n, count) of a window's matrix products at ``rows`` streams and ``steps`` steps:
        the input and weight-gradient products over the whole window, the recurrent ones per step."""
        (D, G), H, N = self.params["weight_x"].shape, self.H, rows * steps
        out = [("x W_x (window)", N, D, G, 1), ("h W_h (per step)", rows, H, G, steps)]
        if backward:
            out += [
                ("dA W_h^T (per step)", rows, G, H, steps),
                ("dW_x (window)", D, N, G, 1),
                ("dW_h (window)", H, N, G, 1),
                ("dA W_x^T (window)", N, G, D, 1),
            ]
        return out
