"""Central finite differences in float64, for checking every backward pass."""

import numpy as np


def numerical_grad(loss_fn, array, eps=1e-6):
    """d loss_fn() / d array by central differences, perturbing ``array`` in place."""
    grad = np.zeros(array.shape)
    for i in np.ndindex(array.shape):  # index the array itself: it may be a strided view
        old = array[i]
        array[i] = old + eps
        plus = loss_fn()
        array[i] = old - eps
        minus = loss_fn()
        array[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def rel_error(analytic, numeric):
    """||a - n|| / max(||a||, ||n||): 0 when equal, ~1 when unrelated."""
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    denom = max(np.linalg.norm(a), np.linalg.norm(n), 1e-30)
    return float(np.linalg.norm(a - n) / denom)
