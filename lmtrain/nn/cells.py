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
(``forward``/``backward`` of a cell: one window; ``step_*``: one time step).

Where the fused kernels are in use (``lmtrain.backend.fused``, numba) each
step's element-wise work is one call to a kernel of ``lmtrain/nn/fused.py``
doing what the numpy lines beside it do, in one pass; at small batches the
step's product with W_h is a kernel too (``StepProducts``).
"""
import lmtrain
from lmtrain.backend import fused, xp
from lmtrain.nn.layers import keep_mask, row_buffer


def padded_width(n):
    """n rounded up to whole 16-float vectors: a dot product over rows padded with zeros has no scalar tail."""
    return -(-n // 16) * 16


class StepProducts:
    """The two products a time step makes with W_h: ``h_{t-1} W_h`` forward and ``d W_h^T`` backward.

    Every other product of a window is one large product over all its steps (``Recurrent``); these
    two are small, B rows (the batch) at a time.  numpy hands them to BLAS.  Where the fused kernels
    are in use and 2 <= B <= 20, ``fused.matmul_t`` does them from W_h^T laid out once per window,
    1.2-4x faster at those sizes (docs/performance.md); beyond 20 rows BLAS is as fast or faster, at
    one row as fast.  The copy costs what the kernel saves in 3-4 forward steps, so windows shorter
    than MIN_STEPS (generation's single steps) keep BLAS.  One per layer: it owns the copy, reused
    from window to window.  Where the kernel makes the products, the LSTM runs its whole loop in one
    kernel call (``fused.lstm_window_forward``/``_backward``), which reads ``wt``, ``x`` and ``Wh`` from here.
    """

    ROWS = range(2, 21)
    MIN_STEPS = 4

    def __init__(self):
        self.Wh, self.kernel, self.wt, self.x = None, None, None, None
        self.source = None  # the bits of the W_h that ``wt`` was made from, kept where ``load`` may reuse it

    @classmethod
    def kernel_for(cls, B, T):
        """The kernels module where a window of T steps at batch B goes to the kernel, else None (BLAS)."""
        k = fused()
        use = B in cls.ROWS and T >= cls.MIN_STEPS and lmtrain.OPENBLAS_SPINS_SHORT
        return k if k is not None and use else None

    def load(self, Wh, B, T, reuse=False, same=False):
        """Use ``Wh`` (H, G*H) for the steps of a window of T steps at batch B.

        ``reuse`` (evaluation, whose weights stay put from window to window) keeps the transposed copy
        when W_h is, bit for bit, the one it was made from: comparing reads W_h and a copy of it in order,
        while transposing writes across rows (docs/performance.md).  ``same`` is the caller's promise that
        W_h has not changed since the previous ``load`` (an evaluation's windows after its first): where
        ``reuse`` allows it, the copy is then kept without comparing.  Training, whose weights move every
        step, transposes every window and drops the copy, so a later evaluation never reuses a transpose
        of weights that training has since changed or masked.
        """
        self.Wh = Wh
        self.kernel = k = self.kernel_for(B, T)
        if k is None:
            return
        H, G = Wh.shape
        self.x = row_buffer(self.x, B, padded_width(H), Wh.dtype, xp.zeros)
        reuse = reuse and Wh.flags.c_contiguous  # (W_h is a whole block of the parameter buffer)
        if reuse:
            bits = Wh.view(f"i{Wh.dtype.itemsize}")  # the same shape, its floats read as integers
            old = self.source
            if (old is not None and old.dtype == bits.dtype and old.shape == bits.shape
                    and (same or k.same_bits(bits.reshape(-1), old.reshape(-1)))):
                return
        self.wt = row_buffer(self.wt, G, padded_width(H), Wh.dtype, xp.zeros)[:G]
        k.transpose_into(Wh, self.wt[:, :H])
        self.source = bits.copy() if reuse else None

    def times(self, h, out):
        """h W_h (B, G*H) into ``out``."""
        if self.kernel is None:
            return xp.matmul(h, self.Wh, out=out)
        B, H = h.shape
        x = self.x[:B]
        x[:, :H] = h
        self.kernel.matmul_t(x, self.wt, out)
        return out

    def out_t(self, B, dtype):
        """The buffer ``times_t`` writes into, one per backward pass: (B, H) for the kernel, (H, B) for BLAS,
        which computes d W_h^T as (W_h d^T)^T: 8% faster than d @ W_h^T at (20 x 2600) x (2600 x 650),
        and W_h needs no transposed copy."""
        H = self.Wh.shape[0]
        return xp.empty((B, H) if self.kernel is not None else (H, B), dtype)

    def times_t(self, d, out):
        """d W_h^T (B, H) into ``out`` (from ``out_t``); the result is ``out`` or a view of it."""
        if self.kernel is None:
            return xp.matmul(self.Wh, d.T, out=out).T
        self.kernel.matmul_t(d, self.Wh, out)
        return out


def sigmoid_(a):
    """In-place logistic function, written with tanh so large |a| cannot overflow."""
    a *= 0.5
    xp.tanh(a, out=a)
    a += 1.0
    a *= 0.5
    return a


class _Buffers:
    """Per-window arrays a cell owns; they grow with the window and are reused, never reallocated per step."""

    def __init__(self):
        self._cap = (0, None, None)
        self._arrays = {}

    def get(self, T, B, dtype, **widths):
        """Views of shape (T + extra, B, width) for name=(extra, width)."""
        if self._cap[0] < T or self._cap[1:] != (B, dtype):
            cap = max(T, self._cap[0] if self._cap[1:] == (B, dtype) else 0)
            self._arrays = {k: xp.empty((cap + extra, B, w), dtype) for k, (extra, w) in widths.items()}
            self._cap = (cap, B, dtype)
        return {k: a[:T + widths[k][0]] for k, a in self._arrays.items()}


class Cell:
    """What a cell declares: ``gates`` blocks of H columns in W_x, W_h and b; the names of its
    state arrays; extra parameters beyond those three.  ``forward`` and ``backward`` run a window,
    making their products with W_h through ``wh``, the layer's StepProducts."""

    gates = 1
    state_names = ("h",)
    extra_params = {}

    def __init__(self, hidden_size):
        self.H = hidden_size
        self.buf = _Buffers()
        self.probe = None  # a list: backward appends the gradient at every state, last step first


class LSTMCell(Cell):
    """Gates f, i, o, g; state (h, c)."""

    gates = 4
    state_names = ("h", "c")

    # -- one step -----------------------------------------------------------
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

    # -- one window -----------------------------------------------------------
    def forward(self, ax, state, wh, extra):
        """``ax`` (T, B, 4H): x W_x + b, turned into gate activations in place.  Returns h (T+1, B, H)."""
        T, B, _ = ax.shape
        b = self.buf.get(T, B, ax.dtype, h=(1, self.H), c=(1, self.H), tanh_c=(0, self.H),
                         dact=(0, 4 * self.H), u=(0, 4 * self.H))
        self.act, self.h, self.c, self.tanh_c, self.dact = ax, b["h"], b["c"], b["tanh_c"], b["dact"]
        h, c, u = self.h, self.c, b["u"]
        h[0], c[0] = state
        k = fused()
        if wh.kernel is not None:  # the step products are fused.matmul_t's too: the whole loop in one call
            k.lstm_window_forward(ax, u, c, self.tanh_c, h, wh.wt, wh.x[:B])
        else:
            for t in range(T):
                wh.times(h[t], u[t])
                if k is not None:
                    k.lstm_step_forward(ax[t], u[t], c[t], c[t + 1], self.tanh_c[t], h[t + 1])
                else:
                    ax[t] += u[t]
                    self.step_forward(ax[t], c[t], c[t + 1], self.tanh_c[t], h[t + 1])
        return h, (h[T].copy(), c[T].copy())

    def backward(self, dh_out, dstate, wh, extra):
        """(d ax, d ah, d state_0, extra grads); for the LSTM d ax and d ah are one array."""
        T, B, H = dh_out.shape
        dact, dhT = self.dact, wh.out_t(B, dh_out.dtype)
        if dstate is None:
            dh_next, dc = xp.zeros((B, H), dh_out.dtype), xp.zeros((B, H), dh_out.dtype)
        else:
            dh_next, dc = dstate[0].copy(), dstate[1].copy()
        k = None if self.probe is not None else fused()  # the probe reads dh and dc, which the kernel never forms
        if k is not None and wh.kernel is not None:  # as in forward: the whole loop in one call
            k.lstm_window_backward(self.act, self.c, self.tanh_c, dh_out, dh_next, dc, dact, wh.Wh, dhT)
            dh_next = dhT
        else:
            for t in reversed(range(T)):
                if k is not None:  # dc becomes the gradient at c_{t-1} in place
                    k.lstm_step_backward(self.act[t], self.c[t], self.tanh_c[t], dh_out[t], dh_next, dc, dact[t])
                else:
                    dh = dh_out[t] + dh_next
                    dc_t = dc  # step_backward completes it in place: the whole gradient at c_t
                    dc = self.step_backward(self.act[t], self.c[t], self.tanh_c[t], dh, dc, dact[t])
                    if self.probe is not None:
                        self.probe.append({"h": dh.copy(), "c": dc_t.copy()})
                dh_next = wh.times_t(dact[t], dhT)
        return dact, dact, (dh_next, dc), {}


class GRUCell(Cell):
    """Gates r, z, n (reset applied after the recurrent product, as cuDNN and PyTorch do); state (h,).

        r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z),  n = tanh(a_n + r * (u_n + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}          with a = x W_x + b and u = h_{t-1} W_h
    """

    gates = 3
    extra_params = {"bias_h": lambda H: (H,)}  # b_hn: inside the reset product, so not mergeable into b

    def forward(self, ax, state, wh, extra):
        T, B, G = ax.shape
        H = self.H
        b = self.buf.get(T, B, ax.dtype, h=(1, H), un=(0, H), dax=(0, G), dah=(0, G), u=(0, G))
        self.act, self.h, self.un, self.dax, self.dah = ax, b["h"], b["un"], b["dax"], b["dah"]
        h, un, b_hn = self.h, self.un, extra["bias_h"]
        h[0], = state
        k = fused()
        for t in range(T):
            u = wh.times(h[t], b["u"][t])
            if k is not None:
                k.gru_step_forward(ax[t], u, b_hn, h[t], un[t], h[t + 1])
            else:
                a = ax[t]
                a[:, :2 * H] += u[:, :2 * H]
                sigmoid_(a[:, :2 * H])                       # r, z
                xp.add(u[:, 2 * H:], b_hn, out=un[t])        # u_n + b_hn, kept for backward
                n = a[:, 2 * H:]
                n += a[:, :H] * un[t]
                xp.tanh(n, out=n)
                z = a[:, H:2 * H]
                xp.subtract(h[t], n, out=h[t + 1])           # h_t = n + z (h_{t-1} - n)
                h[t + 1] *= z
                h[t + 1] += n
        return h, (h[T].copy(),)

    def backward(self, dh_out, dstate, wh, extra):
        T, B, H = dh_out.shape
        act, h, un, dax, dah = self.act, self.h, self.un, self.dax, self.dah
        dhT = wh.out_t(B, dh_out.dtype)
        dh_next = xp.zeros((B, H), dh_out.dtype) if dstate is None else dstate[0].copy()
        k = None if self.probe is not None else fused()
        if k is not None:
            # the gradient at h_t arrives in three parts: from the output, through z and through W_h
            dh_w = xp.zeros((B, H), dh_out.dtype)
            for t in reversed(range(T)):
                k.gru_step_backward(act[t], un[t], h[t], dh_out[t], dh_next, dh_w, dax[t], dah[t])
                dh_w = wh.times_t(dah[t], dhT)
            dh_next += dh_w
        else:
            for t in reversed(range(T)):
                r, z, n = act[t, :, :H], act[t, :, H:2 * H], act[t, :, 2 * H:]
                dh = dh_out[t] + dh_next
                dan = dh * (1.0 - z)
                dan *= 1.0 - n * n                              # through tanh
                dax[t, :, 2 * H:] = dan
                xp.multiply(dan, r, out=dah[t, :, 2 * H:])      # d u_n
                dr = dan * un[t]
                dz = dh * (h[t] - n)
                dr *= r * (1.0 - r)
                dz *= z * (1.0 - z)
                dax[t, :, :H] = dr
                dax[t, :, H:2 * H] = dz
                dah[t, :, :2 * H] = dax[t, :, :2 * H]
                if self.probe is not None:
                    self.probe.append({"h": dh.copy()})
                dh_next = dh * z
                dh_next += wh.times_t(dah[t], dhT)
        return dax, dah, (dh_next,), {"bias_h": dah[:, :, 2 * H:].sum(axis=(0, 1))}


class RNNCell(Cell):
    """The plain (Elman) tanh RNN: h_t = tanh(x W_x + h_{t-1} W_h + b); state (h,)."""

    def forward(self, ax, state, wh, extra):
        T, B, _ = ax.shape
        b = self.buf.get(T, B, ax.dtype, h=(1, self.H), da=(0, self.H), u=(0, self.H))
        self.h, self.da = b["h"], b["da"]
        h = self.h
        h[0], = state
        k = fused()
        for t in range(T):
            u = wh.times(h[t], b["u"][t])
            if k is not None:
                k.rnn_step_forward(ax[t], u, h[t + 1])
            else:
                ax[t] += u
                xp.tanh(ax[t], out=h[t + 1])
        return h, (h[T].copy(),)

    def backward(self, dh_out, dstate, wh, extra):
        T, B, H = dh_out.shape
        h, da = self.h, self.da
        dhT = wh.out_t(B, dh_out.dtype)
        dh_next = xp.zeros((B, H), dh_out.dtype) if dstate is None else dstate[0].copy()
        k = None if self.probe is not None else fused()
        for t in reversed(range(T)):
            if k is not None:
                k.rnn_step_backward(h[t + 1], dh_out[t], dh_next, da[t])
            else:
                xp.add(dh_out[t], dh_next, out=da[t])
                if self.probe is not None:
                    self.probe.append({"h": da[t].copy()})
                da[t] *= 1.0 - h[t + 1] * h[t + 1]
            dh_next = wh.times_t(da[t], dhT)
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

    def __init__(self, weight_x, weight_h, bias, grads=None, weight_drop=0.0, rng=None, cell="lstm", extra=None):
        H = weight_h.shape[0]
        self.cell = CELLS[cell](H)
        self.H = H
        self.params = {"weight_x": weight_x, "weight_h": weight_h, "bias": bias, **(extra or {})}
        for name, shape in self.cell.extra_params.items():
            if name not in self.params:
                self.params[name] = xp.zeros(shape(H), weight_h.dtype)
        self.grads = grads if grads is not None else {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.weight_drop = float(weight_drop)
        self.rng = rng
        self.frozen = False      # reuse the current weight mask (gradient checks)
        self.wmask = None        # (H, G*H) scaled keep-mask of this forward pass, or None
        self._ax = _Buffers()
        self.steps = StepProducts()  # this window's W_h, in the form the per-step products read it

    def recurrent_weight(self, train):
        """W_h as this pass uses it: with a fresh DropConnect mask when training with weight_drop."""
        Wh = self.params["weight_h"]
        if not (train and self.weight_drop > 0):
            self.wmask = None
            return Wh
        if not (self.frozen and self.wmask is not None):
            self.wmask = keep_mask(self.rng, Wh.shape, self.weight_drop, Wh.dtype)
        return Wh * self.wmask

    def _extra(self):
        return {k: self.params[k] for k in self.cell.extra_params}

    def forward(self, x, state, train=False, same_weights=False):
        """``same_weights``: the caller's promise that no weight has changed since this layer's previous
        evaluation forward (``Model.forward``)."""
        T, B, D = x.shape
        Wx, b = self.params["weight_x"], self.params["bias"]
        G = Wx.shape[1]
        self.steps.load(self.recurrent_weight(train), B, T, reuse=not train, same=same_weights)
        self.x = x
        ax = self._ax.get(T, B, x.dtype, ax=(0, G))["ax"]
        xp.matmul(x.reshape(T * B, D), Wx, out=ax.reshape(T * B, G))
        ax += b
        self.h, final = self.cell.forward(ax, state, self.steps, self._extra())
        return self.h[1:], final

    def backward(self, dh_out, dstate=None):
        """``dh_out`` (T, B, H): gradient at every output; ``dstate``: at the final state."""
        T, B, H = dh_out.shape
        D = self.x.shape[2]
        Wx = self.params["weight_x"]
        G = Wx.shape[1]
        dax, dah, dstate0, dextra = self.cell.backward(dh_out, dstate, self.steps, self._extra())
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
