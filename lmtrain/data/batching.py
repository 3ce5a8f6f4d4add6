"""Laying a token stream out as parallel streams, and the one function that cuts windows from it.

Training: the ids are cut into ``batch_size`` contiguous streams of equal
length (the remainder, fewer than ``batch_size`` tokens, is dropped) and
stacked as columns of a (L, B) array.  ``get_batch(data, i, T)`` is the window
starting at row i: its inputs are rows [i, i+T) and its targets the same rows
shifted by one, so each stream is read in order and its state carries from
window to window.  Training, evaluation, the probes, `lmtrain bench` and the
PyTorch comparison all cut their windows with it.

Evaluation counts every target exactly once: ``eval_streams`` lays the N-1
targets of a split out over the streams, pads the last stream and gives the
padding weight 0.

Under data-parallel training each rank reads a contiguous block of the
columns (``data[:, start:stop]``): the streams are the same whatever the
number of ranks, only their owners change.
"""
import numpy as np


def batchify(ids, batch_size):
    """(L, B) view of ``ids`` (no copy: it may be a memory-mapped file): column b is its b-th contiguous
    slice, so a row holds ids L apart and reading a window touches B places of the file."""
    L = len(ids) // batch_size
    return ids[:L * batch_size].reshape(batch_size, L).T


def get_batch(data, i, bptt):
    """(inputs, targets) of the window at row ``i``: up to ``bptt`` rows, fewer at the end of ``data``."""
    T = min(bptt, len(data) - 1 - i)
    return data[i:i + T], data[i + 1:i + 1 + T]


def window_starts(data, bptt):
    """Rows where the windows of a whole pass over ``data`` start."""
    return range(0, len(data) - 1, bptt)


def eval_streams(ids, batch_size):
    """(data, weights): ``data`` (L+1, B) in the layout of ``batchify``, whose L x B targets cover every
    target of ``ids`` once; ``weights`` (L, B) is 1 for those and 0 for the padding after the last."""
    n_targets = len(ids) - 1
    L = -(-n_targets // batch_size)
    padded = np.zeros(L * batch_size + 1, dtype=ids.dtype)
    padded[:len(ids)] = ids
    # column b is padded[b*L : b*L + L + 1]: consecutive columns share one id, so a strided view, not a copy
    data = np.lib.stride_tricks.as_strided(padded, shape=(L + 1, batch_size),
                                           strides=(padded.itemsize, L * padded.itemsize), writeable=False)
    weights = np.ones(L * batch_size, np.float32)  # in the order of ``padded``: the padding is at the end
    weights[n_targets:] = 0
    return data, weights.reshape(batch_size, L).T
