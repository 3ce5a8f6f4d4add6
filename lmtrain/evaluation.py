"""Scoring text with a model: the one loop over windows, and what is built on it.

``stream`` reads an (L, B) layout of token ids (lmtrain/data/batching.py) in
windows, the state carried from each window to the next, and returns the
summed loss and the number of targets; a hook sees every window (its ids, the
model's output, its loss) to do more with it: the neural cache reads the
hidden states, dynamic evaluation adapts the weights, the gradient statistics
and the gradient-flow probe run backward.  ``evaluate`` is the perplexity of
a split as `lmtrain eval` and training's validation compute it; ``feed``
runs a prompt through the model for generation.
"""

import contextlib
import math
from typing import NamedTuple

import numpy as np

from lmtrain.backend import to_numpy, xp
from lmtrain.data.batching import eval_streams, get_batch, window_starts
from lmtrain.world import World

CHUNK = 256  # prompt tokens fed per forward pass: bounds memory for long prompts


def perplexity(loss):
    return math.exp(min(loss, 700.0))


class Window(NamedTuple):
    """What ``stream`` hands its hook after scoring one window."""

    index: int  # 0, 1, ... in reading order
    row: int  # the layout's row the window starts at
    x: np.ndarray  # (T, B) input ids
    y: np.ndarray  # (T, B) target ids
    out: object  # the model's output (logits, or the adaptive softmax's input rows)
    loss: tuple  # the model's ModelLoss


class Result(NamedTuple):
    loss: float  # mean NLL per target
    ppl: float
    tokens: int  # targets counted


def stream(model, data, bptt, weights=None, on_window=None, grad=False, adapts=False, progress=None):
    """(summed NLL, targets counted) over ``data`` (L, B), read in windows of ``bptt`` rows with the
    state carried across them.

    ``weights`` (L - 1, B) weighs each target (0: padding, not counted).  ``on_window(Window)`` is called
    after each window's loss; ``grad`` keeps what a backward in the hook needs; ``adapts`` says the hook
    changes the weights (otherwise the model may keep what it derives from them from one window to the
    next).  ``progress`` wraps the windows' start rows (a progress bar).
    """
    state = model.init_state(data.shape[1])
    total = count = 0.0
    starts = window_starts(data, bptt)
    with contextlib.nullcontext() if adapts else model.weights_held():
        for n, i in enumerate(starts if progress is None else progress(starts)):
            x, y = get_batch(data, i, bptt)
            w = None if weights is None else xp.asarray(weights[i : i + len(y)])
            out, state = model.forward(xp.asarray(x), state, train=False)
            loss = model.loss(out, xp.asarray(y), w, grad=grad)
            total += loss.total
            count += loss.count
            if on_window is not None:
                on_window(Window(n, i, x, y, out, loss))
    return total, count


def evaluate(model, ids, batch_size, bptt=35, world=World()):
    """The ``Result`` over a whole split: every target counted once (``eval_streams``), state carried.

    With several ranks, each reads its block of the streams and the sums are added, so the result is the
    single process's.
    """
    data, weights = eval_streams(ids, batch_size)
    lo, hi = world.shard(batch_size)
    total = count = 0.0
    if hi > lo:
        total, count = stream(model, data[:, lo:hi], bptt, weights[:, lo:hi])
    total, count = world.sum([total, count])
    loss = total / count
    return Result(loss, perplexity(loss), int(count))


def feed(model, ids, state):
    """Run ``ids`` through the model from ``state``; returns the float64 next-word scores after the last
    one (logits, or under the adaptive softmax the exact log-probabilities: scores of the same
    distribution) and the state after it."""
    out = None
    for i in range(0, len(ids), CHUNK):
        chunk = xp.asarray(np.asarray(ids[i : i + CHUNK], dtype=np.int32)[:, None])
        out, state = model.forward(chunk, state, train=False)
    return to_numpy(model.scores(out[-1:])[0]).astype(np.float64), state
