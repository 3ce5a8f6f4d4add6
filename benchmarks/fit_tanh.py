"""Fit the rational approximation of tanh that lmtrain/fast/kernels.py uses in float32.

    python benchmarks/fit_tanh.py

tanh(x) ~ x P(x^2) / Q(x^2) on [0, 9], P of degree 6 and Q of degree 3 in x^2, Q(0) = 1.  The fit
minimises the largest relative error: Sanathanan-Koerner iterations (each a linear least-squares
problem, P - f Q weighted by 1 / Q of the previous iterate) with Lawson's reweighting towards the
worst points, in a Chebyshev basis for conditioning.  It prints the coefficients and the errors of
the result evaluated in float32, as the kernel evaluates it, next to numpy's own float32 tanh.
"""

import numpy as np

X, DEG_P, DEG_Q = 9.0, 6, 3


def fit(iterations=200):
    x = np.unique(np.concatenate([np.linspace(0, X, 40001)[1:], np.geomspace(1e-5, X, 5000)]))
    f = np.tanh(x) / x
    t = 2 * x * x / (X * X) - 1  # x^2 mapped to [-1, 1]
    Tp = np.polynomial.chebyshev.chebvander(t, DEG_P)
    Tq = np.polynomial.chebyshev.chebvander(t, DEG_Q)
    q_prev, w, best = np.ones_like(x), np.ones_like(x), None
    for _ in range(iterations):
        A = np.concatenate([Tp, -f[:, None] * Tq], 1) * (w / (f * np.abs(q_prev)))[:, None]
        coef = np.linalg.svd(A, full_matrices=False)[2][-1]  # the least-squares null vector
        cp, cq = coef[: DEG_P + 1], coef[DEG_P + 1 :]
        q_prev = Tq @ cq
        err = np.abs((Tp @ cp) / q_prev / f - 1)
        if best is None or err.max() < best[0]:
            best = (err.max(), cp, cq)
        w = w * np.maximum(err / err.max(), 1e-3) ** 0.5
        w /= w.max()
    # back to powers of x^2
    to_s = np.polynomial.Polynomial([-1, 2 / (X * X)])
    p = np.polynomial.Polynomial(np.polynomial.chebyshev.cheb2poly(best[1]))(to_s).coef
    q = np.polynomial.Polynomial(np.polynomial.chebyshev.cheb2poly(best[2]))(to_s).coef
    return best[0], p / q[0], q / q[0]


def tanh32(x, p, q):
    """The kernel's evaluation, in float32 (Horner in x^2, clamped to [-9, 9])."""
    f = np.float32
    x = np.clip(x, f(-X), f(X))
    s = x * x
    P, Q = f(p[-1]), f(q[-1])
    for c in p[-2::-1]:
        P = P * s + f(c)
    for c in q[-2::-1]:
        Q = Q * s + f(c)
    return np.clip(x * P / Q, f(-1), f(1))


if __name__ == "__main__":
    err, p, q = fit()
    print(f"largest relative error in exact arithmetic: {err:.2e}")
    print("TANH_P =", tuple(float(c) for c in p))
    print("TANH_Q =", tuple(float(c) for c in q))
    x = np.linspace(-9, 9, 2_000_001, dtype=np.float32)
    ref = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(np.tanh(x))).astype(np.float64)
    ours = np.abs(tanh32(x, p, q) - ref) / ulp
    theirs = np.abs(np.tanh(x) - ref) / ulp
    print(
        f"float32 error in ulps: this fit max {ours.max():.2f} mean {ours.mean():.2f}; "
        f"numpy's tanh max {theirs.max():.2f} mean {theirs.mean():.2f}"
    )
