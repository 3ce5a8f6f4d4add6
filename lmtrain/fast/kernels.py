"""Fused element-wise kernels, compiled by numba: the optional ``fast`` extra.

numpy runs one expression per call, each a pass over memory: the LSTM step is
about a dozen calls forward and twenty backward, the softmax three passes over
the (N, V) logits.  Each kernel here does the same arithmetic as the numpy code
it stands in for (named in its docstring), in one compiled loop nest, so
each value makes one trip through memory instead of one per operation.  The
numpy code (lmtrain/nn/, lmtrain/optim.py) stays the reference a reader learns
the equations from; tests/test_kernels.py holds each kernel to it, and the
layers of lmtrain/fast/layers.py call them.

This module imports numba at the top: ``lmtrain.build`` imports the fast path
only when numba is installed and not turned off (``LMTRAIN_KERNELS=numpy`` or
``train.kernels: numpy``).

Three details make the loops fast (docs/performance.md has the measurements):

- numba calls the C library's scalar ``tanh`` and ``exp``, which keep a loop
  from being vectorised (a fused LSTM step with them is ~4x *slower* than
  numpy's SIMD calls).  In float32 the kernels use ``tanh32`` and ``exp32``
  below, written with arithmetic alone (and only the integer conversions AVX2
  has) so that LLVM vectorises them; they are as accurate as numpy's (within a
  few units in the last place).  float64 keeps the C library's functions: it
  is the path of the gradient checks.
- No fast-math: the kernels keep IEEE semantics and the order of their
  sums (see ``kernel`` below), so a NaN still reaches the loss, where
  training's non-finite-step guard sees it, and results repeat to the bit.
  The exceptions are narrow: the time step's product with W_h
  (``matmul_t``), a matrix product like BLAS's, whose sums may be
  reordered; the softmax's row sum (``row_sum``), reordered so that it
  vectorises, in one compiled order that every kernel shares; and the row
  maximum (``row_max``), exact in any order.  ``tanh32`` and ``exp32`` may
  fuse a multiply and an add into one instruction (FMA, rounded once): that
  reorders nothing and makes them faster and more accurate.
- Simple loops: a loop touching many arrays stays scalar (see the forward
  kernels), so a step is a few loops over one row each.

The kernels release the GIL; the callers split long ones over threads by rows
(``lmtrain.threads.parallel_rows``), as the numpy code does, so one thread
count governs both paths.  The step product and ``transpose_into``, called
once per step and too short for that, split themselves (numba's ``prange``,
on OpenMP's threads) over the same count (``set_threads``), as do the LSTM's
window kernels, which run a window's whole loop of steps in one call.
"""

import functools
import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

# IEEE arithmetic throughout (no fast-math): every kernel computes in the order its source says, so
# two kernels summing the same terms agree to the bit (evaluation's nll_rows and training's
# softmax_rows: dynamic evaluation at --dyn-lr 0 must equal plain evaluation exactly).  The numpy
# error model drops the zero-division checks that would stop loops from being vectorised.
kernel = functools.partial(njit, cache=True, nogil=True, error_model="numpy")
inline = functools.partial(njit, error_model="numpy")  # small enough that LLVM inlines them
# Polynomials in Horner's form are chains of a * x + b: as separate instructions each link waits for two
# results, as one FMA for one, so FMAs shorten the chain that bounds exp32's and tanh32's speed (and
# round once instead of twice).  "contract" allows exactly that fusion and nothing else;
# the flag stays on these functions' own instructions where LLVM inlines them into a kernel.
polynomial = functools.partial(njit, error_model="numpy", fastmath={"contract"})

# ---------------------------------------------------------------------------
# tanh and exp that vectorise (float32), the C library's (float64)
# ---------------------------------------------------------------------------
# tanh(x) ~ x P(x^2) / Q(x^2) on |x| <= 9 (beyond it tanh rounds to +-1 in float32).  The
# coefficients come from a rational minimax fit of relative error (6.6e-9 in exact arithmetic;
# evaluated in float32 with FMAs at most 4.7 ulp, mean 0.6, against numpy's 1.4 and 0.3), found with
# benchmarks/fit_tanh.py.
TANH_P = (
    0.9999999934042311,
    0.13084006527869405,
    0.003103952103765131,
    1.1154262240939213e-05,
    -2.022502358370353e-08,
    5.277844597776977e-11,
    -8.48843278520873e-14,
)
TANH_Q = (1.0, 0.464173336357353, 0.024495162351740273, 0.00025461390493381337)
_P = tuple(np.float32(c) for c in TANH_P)
_Q = tuple(np.float32(c) for c in TANH_Q)
_ONE, _HALF, _NINE = np.float32(1.0), np.float32(0.5), np.float32(9.0)
_SATURATED = np.float32(9.05)  # from here on tanh(x) rounds to +-1 in float32


@polynomial
def tanh32(x0):
    x = min(max(x0, -_NINE), _NINE)
    s = x * x
    p = (((((_P[6] * s + _P[5]) * s + _P[4]) * s + _P[3]) * s + _P[2]) * s + _P[1]) * s + _P[0]
    q = ((_Q[3] * s + _Q[2]) * s + _Q[1]) * s + _Q[0]
    y = min(max(x * p / q, -_ONE), _ONE)
    return y if abs(x0) < _SATURATED else (_ONE if x0 > 0 else -_ONE)


# exp(x) = 2^k e^r with k = round(x / ln 2), |r| <= ln(2)/2: r by Cody and Waite's two-part ln 2,
# e^r by its Taylor series to r^7 (relative error below 1e-8 there), 2^k by writing k into a
# float32's exponent bits.  x is clamped to [-87, 88], where 2^k stays a normal float32.  k goes
# through int32, not int64: AVX2 converts eight floats to int32 in one instruction but has no
# vector conversion to int64, so an int64 k would leave the loop scalar (exp32 takes half the time).
# With FMAs it is within 0.9 ulp of exp (mean 0.26; numpy's float32 exp: 2.3, mean 0.47).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_TAYLOR = tuple(np.float32(1.0 / math.factorial(n)) for n in range(8))
_EXP_LO, _EXP_HI = np.float32(-87.0), np.float32(88.0)


@polynomial
def exp32(x):
    x = min(max(x, _EXP_LO), _EXP_HI)
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI - k * _LN2_LO
    t = _TAYLOR
    p = ((((((t[7] * r + t[6]) * r + t[5]) * r + t[4]) * r + t[3]) * r + t[2]) * r + t[1]) * r + t[0]
    return p * np.int32((np.int32(k) + 127) << 23).view(np.float32)


def tanh(x):
    """tanh in the kernels: tanh32 on float32, math.tanh on float64."""


def exp(x):
    """exp in the kernels: exp32 on float32, math.exp on float64."""


@overload(tanh)
def _tanh(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: tanh32(x)
    return lambda x: math.tanh(x)


@overload(exp)
def _exp(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: exp32(x)
    return lambda x: math.exp(x)


def sigmoid(x):
    """The logistic function as cells.sigmoid_ writes it, through tanh (no overflow for large |x|)."""


@overload(sigmoid)
def _sigmoid(x):
    # constants of x's own type: a Python float would turn a float32 argument into float64
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _HALF * tanh32(_HALF * x) + _HALF
    return lambda x: 0.5 * math.tanh(0.5 * x) + 0.5


# ---------------------------------------------------------------------------
# recurrent cells: one time step, forward and backward (lmtrain/nn/cells.py holds the numpy versions)
# ---------------------------------------------------------------------------
# Each kernel is a few simple loops per row over slices that start at 0, one per gate block:
# - with many arrays read and written in one loop, LLVM cannot prove they do not overlap and leaves it
#   scalar, several times slower;
# - an index with an offset (``a[3 * H + j]``) may be negative as far as LLVM knows, and numba wraps
#   negative indices, which keeps the loop scalar too: the g gate's tanh loop, written that way, took
#   half of the LSTM step.
# The rows stay in cache between the loops.
@inline
def lstm_row_forward(ab, ub, cp, cb, tb, hb):
    """One batch row of ``lstm_step_forward``."""
    H = cb.shape[0]
    for k in range(3 * H):
        ab[k] = sigmoid(ab[k] + ub[k])
    f, i, o, g, ug = ab[:H], ab[H : 2 * H], ab[2 * H : 3 * H], ab[3 * H :], ub[3 * H :]
    for j in range(H):
        g[j] = tanh(g[j] + ug[j])
    for j in range(H):
        cb[j] = f[j] * cp[j] + i[j] * g[j]
    for j in range(H):
        tb[j] = tanh(cb[j])
    for j in range(H):
        hb[j] = o[j] * tb[j]


@kernel
def lstm_step_forward(a, u, c_prev, c, tanh_c, h):
    """LSTMCell.step_forward after ``a += u``: pre-activations a (B, 4H) in the order f, i, o, g become
    the activations in place; writes c_t, tanh(c_t) and h_t (B, H)."""
    for b in range(c.shape[0]):
        lstm_row_forward(a[b], u[b], c_prev[b], c[b], tanh_c[b], h[b])


@inline
def lstm_row_backward(ab, cp, tc, dho, dhn, dcb, db):
    """One batch row of ``lstm_step_backward``."""
    H = dcb.shape[0]
    f, i, o, g = ab[:H], ab[H : 2 * H], ab[2 * H : 3 * H], ab[3 * H :]
    df, di, do, dg = db[:H], db[H : 2 * H], db[2 * H : 3 * H], db[3 * H :]
    # _ONE, not 1.0, here and below: a Python float would turn float32 arithmetic into float64
    for j in range(H):  # through h_t = o tanh(c_t): to o, and on to c_t
        dh = dho[j] + dhn[j]
        do[j] = dh * tc[j] * o[j] * (_ONE - o[j])
        dcb[j] = dcb[j] + dh * o[j] * (_ONE - tc[j] * tc[j])
    for j in range(H):  # through c_t = f c_{t-1} + i g
        dcc = dcb[j]
        df[j] = dcc * cp[j] * f[j] * (_ONE - f[j])
        di[j] = dcc * g[j] * i[j] * (_ONE - i[j])
        dg[j] = dcc * i[j] * (_ONE - g[j] * g[j])
        dcb[j] = dcc * f[j]


@kernel
def lstm_step_backward(act, c_prev, tanh_c, dh_out, dh_next, dc, da):
    """LSTMCell.step_backward with ``dh = dh_out + dh_next``: writes the gradient of the
    pre-activations into ``da`` (B, 4H) and replaces ``dc`` (the gradient arriving at c_t) with
    the gradient at c_{t-1}."""
    for b in range(dc.shape[0]):
        lstm_row_backward(act[b], c_prev[b], tanh_c[b], dh_out[b], dh_next[b], dc[b], da[b])


@kernel
def gru_step_forward(a, u, b_hn, h_prev, un, h):
    """GRUCell.forward's step: a (B, 3H) = x W_x + b in the order r, z, n becomes the activations in
    place; writes u_n + b_hn (kept for backward) and h_t."""
    B, H = h.shape
    for b in range(B):
        ab, ub, unb, hb, hp = a[b], u[b], un[b], h[b], h_prev[b]
        for k in range(2 * H):
            ab[k] = sigmoid(ab[k] + ub[k])
        r, z, n, u_n = ab[:H], ab[H : 2 * H], ab[2 * H :], ub[2 * H :]
        for j in range(H):
            unb[j] = u_n[j] + b_hn[j]
        for j in range(H):
            n[j] = tanh(n[j] + r[j] * unb[j])
        for j in range(H):
            hb[j] = n[j] + z[j] * (hp[j] - n[j])


@kernel
def gru_step_backward(act, un, h_prev, dh_out, dh_carry, dh_w, dax, dah):
    """GRUCell.backward's step.  The gradient at h_t is ``dh_out + dh_carry + dh_w`` (the last two:
    the parts through z and through W_h of step t+1); writes dax, dah (B, 3H) and replaces
    ``dh_carry`` by this step's part through z, dh * z."""
    B, H = dh_out.shape
    for b in range(B):
        ab, xb, hb = act[b], dax[b], dah[b]
        r, z, n = ab[:H], ab[H : 2 * H], ab[2 * H :]
        dr, dz, dn, dr_h, dz_h, dn_h = xb[:H], xb[H : 2 * H], xb[2 * H :], hb[:H], hb[H : 2 * H], hb[2 * H :]
        dh, unb, hp, dho, dhw = dh_carry[b], un[b], h_prev[b], dh_out[b], dh_w[b]
        for j in range(H):  # dh_carry holds the whole gradient at h_t until the last loop
            dh[j] = dho[j] + dh[j] + dhw[j]
        for j in range(H):  # through h_t = n + z (h_{t-1} - n) to n, and through its tanh
            dn[j] = dh[j] * (_ONE - z[j]) * (_ONE - n[j] * n[j])
        for j in range(H):  # to z, through its sigmoid
            dz[j] = dh[j] * (hp[j] - n[j]) * z[j] * (_ONE - z[j])
        for j in range(H):  # through n's r * (u_n + b_hn): to r, through its sigmoid, and to u_n
            dr[j] = dn[j] * unb[j] * r[j] * (_ONE - r[j])
            dn_h[j] = dn[j] * r[j]
        for j in range(H):
            dr_h[j] = dr[j]
            dz_h[j] = dz[j]
        for j in range(H):
            dh[j] = dh[j] * z[j]


@kernel
def rnn_step_forward(a, u, h):
    """RNNCell.forward's step: h_t = tanh(a + u), with a = x W_x + b and u = h_{t-1} W_h."""
    B, H = h.shape
    for b in range(B):
        for j in range(H):
            h[b, j] = tanh(a[b, j] + u[b, j])


@kernel
def rnn_step_backward(h, dh_out, dh_next, da):
    """RNNCell.backward's step: da = (dh_out + dh_next) (1 - h_t^2)."""
    B, H = h.shape
    for b in range(B):
        for j in range(H):
            hh = h[b, j]
            da[b, j] = (dh_out[b, j] + dh_next[b, j]) * (_ONE - hh * hh)


# ---------------------------------------------------------------------------
# the product of one time step with W_h, at small batches (fast/layers.StepProducts calls it)
# ---------------------------------------------------------------------------
# A step multiplies the batch's few rows by W_h: (B, H) x (H, 4H) forward, (B, 4H) x (4H, H) backward. OpenBLAS copies
# W_h into its own blocked layout on every call, and at B <= 20 rows that copy and its thread hand-over cost as much as
# the arithmetic (``lmtrain bench`` times BLAS and this kernel at a config's shapes: product_ways in lmtrain/bench.py).
# Here every output is the dot product of two contiguous rows, W_h^T being laid out once per window
# (``transpose_into``); four batch rows and three weight rows at a time give twelve sums that share their loads.  These
# are the only kernels that reorder sums (``reassoc``, so that LLVM can keep vector-wide partial sums; no ``nnan``, so a
# NaN still gets through): a product's last bits differ from BLAS's, as BLAS's differ between machines.  Each output is
# one thread's, summed in a fixed order, so the results repeat to the bit.
@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath={"reassoc", "contract"})
def matmul_t(x, wt, out):
    """out = x @ wt.T for x (B, K) and wt (N, K), rows contiguous; threads share the N output columns."""
    B, (N, K) = x.shape[0], wt.shape
    zero = out.dtype.type(0)
    for triple in prange((N + 2) // 3):
        # three columns: a multiple of 3 past N repeats the last one (the same sums, written twice)
        n0, n1, n2 = 3 * triple, min(3 * triple + 1, N - 1), min(3 * triple + 2, N - 1)
        w0, w1, w2 = wt[n0], wt[n1], wt[n2]
        for i in range(0, B - B % 4, 4):  # 4 x 3 sums: with the 4 values they load, AVX2's 16 registers
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = s30 = s31 = s32 = zero
            for k in range(K):
                a, b, c = w0[k], w1[k], w2[k]
                s00 += x0[k] * a
                s01 += x0[k] * b
                s02 += x0[k] * c
                s10 += x1[k] * a
                s11 += x1[k] * b
                s12 += x1[k] * c
                s20 += x2[k] * a
                s21 += x2[k] * b
                s22 += x2[k] * c
                s30 += x3[k] * a
                s31 += x3[k] * b
                s32 += x3[k] * c
            out[i, n0], out[i, n1], out[i, n2] = s00, s01, s02
            out[i + 1, n0], out[i + 1, n1], out[i + 1, n2] = s10, s11, s12
            out[i + 2, n0], out[i + 2, n1], out[i + 2, n2] = s20, s21, s22
            out[i + 3, n0], out[i + 3, n1], out[i + 3, n2] = s30, s31, s32
        for i in range(B - B % 4, B):
            xi = x[i]
            s0 = s1 = s2 = zero
            for k in range(K):
                s0 += xi[k] * w0[k]
                s1 += xi[k] * w1[k]
                s2 += xi[k] * w2[k]
            out[i, n0], out[i, n1], out[i, n2] = s0, s1, s2


@njit(cache=True, nogil=True, parallel=True)
def transpose_into(w, out):
    """out[...] = w.T, in 64 x 64 tiles that stay in cache, reading rows of w (numpy's copy of the transposed
    view takes 1.5x as long)."""
    K, N = w.shape
    for tile in prange((N + 63) // 64):
        n0 = tile * 64
        for k0 in range(0, K, 64):
            for k in range(k0, min(K, k0 + 64)):
                for n in range(n0, min(N, n0 + 64)):
                    out[n, k] = w[k, n]


# ---------------------------------------------------------------------------
# the LSTM's loop over a window, where its step products are matmul_t's (nn/cells.LSTMCell holds the loop)
# ---------------------------------------------------------------------------
# Called step by step from Python, each step is two kernel calls and a copy, with the interpreter's work
# between them while the threads wait; and the cell's element-wise work runs on one core.  Here the whole
# loop is one call: per step the product (split over the threads by weight rows) and then the cell
# (split by batch rows where the step has at least PARALLEL_CELL units), the same arithmetic in the same
# order, so the result is the same to the bit.  Splitting the cell costs a few microseconds of hand-over,
# more than a small step's cell work and less than a large one's: PARALLEL_CELL is between the two
# (``lmtrain bench --layers`` shows the cell's share of a window; docs/performance.md).
PARALLEL_CELL = 8192


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def lstm_window_forward(ax, u, c, tanh_c, h, wt, x):
    """LSTMCell.forward's loop: for each step t, u[t] = h[t] W_h through ``matmul_t`` from W_h^T laid
    out in ``wt`` (``x``: the zero-padded (B, width) row buffer h[t] is copied into), then
    ``lstm_step_forward`` on the step's rows."""
    T, B, H = tanh_c.shape
    for t in range(T):
        x[:, :H] = h[t]
        matmul_t(x, wt, u[t])
        if B * H >= PARALLEL_CELL:
            for b in prange(B):
                lstm_row_forward(ax[t, b], u[t, b], c[t, b], c[t + 1, b], tanh_c[t, b], h[t + 1, b])
        else:
            for b in range(B):
                lstm_row_forward(ax[t, b], u[t, b], c[t, b], c[t + 1, b], tanh_c[t, b], h[t + 1, b])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def lstm_window_backward(act, c, tanh_c, dh_out, dh_next, dc, da, wh, dh_w):
    """LSTMCell.backward's loop: for each step t, last first, ``lstm_step_backward`` on the step's rows
    with the gradient ``dh_next`` arriving through W_h, then that gradient for step t - 1,
    da[t] W_h^T through ``matmul_t``, into ``dh_w``.  ``dc`` ends as the gradient at c_0; the
    gradient at h_0 is in ``dh_w`` (T > 0)."""
    T, B, H = dh_out.shape
    for t in range(T - 1, -1, -1):
        if B * H >= PARALLEL_CELL:
            for b in prange(B):
                lstm_row_backward(act[t, b], c[t, b], tanh_c[t, b], dh_out[t, b], dh_next[b], dc[b], da[t, b])
        else:
            for b in range(B):
                lstm_row_backward(act[t, b], c[t, b], tanh_c[t, b], dh_out[t, b], dh_next[b], dc[b], da[t, b])
        matmul_t(da[t], wh, dh_w)
        dh_next = dh_w


def set_threads(n):
    """Threads for the kernels that split their work themselves (``parallel=True``); the calling thread's setting."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


# ---------------------------------------------------------------------------
# softmax cross-entropy over rows (nn/layers.SoftmaxCrossEntropy holds the numpy version)
# ---------------------------------------------------------------------------
@njit(fastmath={"nnan", "nsz", "reassoc"})  # the maximum is exact in any order, so these flags let it
def row_max(row):  # vectorise; a NaN in the row reaches the loss through the sum
    m = row[0]
    for v in range(1, row.shape[0]):
        m = max(m, row[v])
    return m


@inline
def row_exp(row, m, out):
    """out = exp(row - m)."""
    for v in range(row.shape[0]):
        out[v] = exp(row[v] - m)


@njit(fastmath={"reassoc", "nsz"})  # re-associated, so that it vectorises: one compiled order, used by
def row_sum(x):  # every kernel below, so they agree to the bit
    s = 0.0  # float64 partial sums, whatever the row's type
    for v in range(x.shape[0]):
        s += x[v]
    return s


# Shifting a row by its maximum keeps exp from overflowing, but finding the maximum is a pass over the
# row that reads it from memory (a third of the softmax's time at (700, 10000)).  Logits are rarely
# large, so the kernels first exponentiate the row unshifted, the way the numpy path does, and judge the
# sum.  Below e^64 no term overflowed or was clamped from above by exp32 (any such term alone exceeds
# e^88), and the sum fits a float32.  From e^-40 up, the terms exp32 clamps from below, at e^-87, move
# the sum by at most V e^-87, a relative 4e-21 V: nothing.  Outside those bounds, or NaN, the row is
# done again shifted by its maximum.
_SUM_LO, _SUM_HI = math.exp(-40.0), math.exp(64.0)


@inline
def row_exp_sum(row, out):
    """out = exp(row - m) and its sum s; returns (m, s) with m = 0 when it is safe, else the row's maximum."""
    m = row.dtype.type(0)
    row_exp(row, m, out)
    s = row_sum(out)
    if not (_SUM_LO <= s < _SUM_HI):
        m = row_max(row)
        row_exp(row, m, out)
        s = row_sum(out)
    return m, s


@kernel
def softmax_rows(logits, targets, row_w, count, at_target, grad, nll):
    """SoftmaxCrossEntropy's forward and backward for training, a row at a time: with e = exp(logits - m_n)
    and s its sum (``row_exp_sum``), -log p(target) = log(s) + m_n - logit[target] into ``nll``, and
    d loss / d logits = e w_n / (s count), minus ``at_target`` (w_n / count) at the target, into ``grad``."""
    N = logits.shape[0]
    for n in range(N):
        row, out = logits[n], grad[n]
        m, s = row_exp_sum(row, out)
        nll[n] = math.log(s) + (m - row[targets[n]])
        k = _ONE / (row.dtype.type(s) * count) * row_w[n]  # the order of the numpy path's float32 operations
        for v in range(out.shape[0]):
            out[v] *= k
        out[targets[n]] -= at_target[n]


@kernel
def nll_rows(logits, targets, nll):
    """softmax_rows for evaluation: -log p(target) alone, no gradient.  The exps of a row go to one scratch row that
    stays in cache instead of an (N, V) array, and are summed by the same code, so the result is the same."""
    N = logits.shape[0]
    scratch = np.empty(logits.shape[1], logits.dtype)
    for n in range(N):
        row = logits[n]
        m, s = row_exp_sum(row, scratch)
        nll[n] = math.log(s) + (m - row[targets[n]])


# ---------------------------------------------------------------------------
# the embedding's gradient (nn/layers.Embedding holds the numpy version)
# ---------------------------------------------------------------------------
@kernel
def add_rows(out, ids, rows):
    """Embedding.backward's sum over repeated words: out[ids[n]] += rows[n], n in order, in one pass where
    numpy needs a sort and a segmented sum (``lmtrain bench --layers`` times the embedding's backward)."""
    for n in range(ids.shape[0]):
        o, r = out[ids[n]], rows[n]
        for j in range(o.shape[0]):
            o[j] += r[j]


# ---------------------------------------------------------------------------
# optimizer updates on a slice of the flat parameter buffer (optim.py holds the numpy versions)
# ---------------------------------------------------------------------------
# The scalars come in the buffers' type (a Python float would make the arithmetic float64).
@kernel
def sgd_update(p, g, lr_scale):
    """Plain SGD: p -= (lr * clip scale) g."""
    for k in range(p.shape[0]):
        p[k] -= lr_scale * g[k]


@kernel
def adam_update(p, g, m, v, grad_scale, l2, shrink, b1, c1, b2, c2, eps, step_size):
    """Adam with the bias correction folded into ``step_size``: g' = grad_scale g + l2 p;
    m = b1 m + c1 g'; v = b2 v + c2 g'^2 (c = 1 - b); p = shrink p - step_size m / (sqrt(v) + eps),
    where ``shrink`` is AdamW's 1 - lr wd (1 otherwise)."""
    for k in range(p.shape[0]):
        pk = p[k]
        gk = grad_scale * g[k] + l2 * pk
        mk = b1 * m[k] + c1 * gk
        vk = b2 * v[k] + c2 * (gk * gk)
        m[k], v[k] = mk, vk
        p[k] = shrink * pk - step_size * (mk / (np.sqrt(vk) + eps))
