"""Laying a token stream out as parallel streams and walking it in BPTT windows.

Training: the ids are cut into ``batch_size`` contiguous streams of equal
length (the remainder, fewer than ``batch_size`` tokens, is dropped) and
stacked as columns of a (L, B) array.  Window k covers rows
[k*bptt, (k+1)*bptt]: inputs are its first rows, targets the same rows shifted
by one, so each stream is read in order and its state carries from window to
window.

Evaluation counts every target exactly once: the N-1 targets of a split are
divided among the streams, the last stream is padded and the padding has
weight 0.
"""
import numpy as np


def batchify(ids, batch_size):
    """(L, B) array: column b is the b-th contiguous slice of ``ids``."""
    L = len(ids) // batch_size
    return np.ascontiguousarray(ids[:L * batch_size].reshape(batch_size, L).T)


def num_windows(length, bptt):
    """Windows over a (length, B) array: there are length-1 targets per stream."""
    return -(-(length - 1) // bptt)


def windows(data, bptt, start=0):
    """Yield (inputs, targets), each (T, B), for windows ``start``, ``start+1``, ..."""
    for k in range(start, num_windows(len(data), bptt)):
        i = k * bptt
        T = min(bptt, len(data) - 1 - i)
        yield data[i:i + T], data[i + 1:i + 1 + T]


def eval_streams(ids, batch_size):
    """(inputs, targets, weights), each (L, B), covering every target of ``ids`` once."""
    n_targets = len(ids) - 1
    L = -(-n_targets // batch_size)
    padded = np.zeros(L * batch_size + 1, dtype=ids.dtype)
    padded[:len(ids)] = ids
    starts = np.arange(batch_size) * L
    t = np.arange(L)[:, None]
    pos = starts[None, :] + t
    inputs = padded[pos]
    targets = padded[pos + 1]
    weights = (pos < n_targets).astype(np.float32)
    return inputs, targets, weights
