"""Central finite differences in float64, for checking every backward pass."""
import numpy as np


def numerical_grad(loss_fn, array, eps=1e-6):
    """d loss_fn() / d array by central differences, perturbing ``array`` in place."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = loss_fn()
        flat[i] = old - eps
        minus = loss_fn()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def rel_error(analytic, numeric):
    """||a - n|| / max(||a||, ||n||): 0 when equal, ~1 when unrelated."""
    a, n = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    denom = max(np.linalg.norm(a), np.linalg.norm(n), 1e-30)
    return float(np.linalg.norm(a - n) / denom)
