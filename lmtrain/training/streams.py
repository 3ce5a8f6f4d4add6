"""This rank's training streams: its block of the training split's parallel streams, the hidden state
each stream carries from window to window, its random resets, and its micro-batches."""

import numpy as np

from lmtrain.backend import to_numpy, xp
from lmtrain.data.batching import batchify, get_batch


def reset_streams(state, which):
    """Zero the carried (h, c) of the streams (batch columns) selected by a boolean mask."""
    if which.any():
        for layer in state:
            for s in layer:
                s[which] = 0


def window_length(train_cfg, rng):
    """The next window's length: train.bptt, or with train.variable_bptt one drawn as AWD-LSTM does."""
    t = train_cfg
    if not t.variable_bptt:
        return t.bptt
    base = t.bptt if rng.random() < 0.95 else t.bptt / 2
    return int(min(max(5, int(rng.normal(base, 5))), t.bptt + 20))


class Streams:
    """Columns [lo, hi) of the (L, batch_size) layout of ``ids`` (``batchify``: a view of the memory-mapped
    ids) and their carried state.  ``parts`` are the micro-batches, column ranges within the block, each one
    forward pass (one, unless train.accumulate > 1)."""

    def __init__(self, ids, batch_size, accumulate, model, world):
        self.batch_size, self.model, self.world = batch_size, model, world
        self.lo, self.hi = world.shard(batch_size)
        self.data = batchify(ids, batch_size)[:, self.lo : self.hi]
        n = (self.hi - self.lo) // accumulate
        self.parts = [(k * n, (k + 1) * n) for k in range(accumulate)]
        self.grad_sum = xp.zeros_like(model.store.grad) if accumulate > 1 else None
        self.zero()

    @property
    def rows(self):
        """Rows of the layout: an epoch reads windows starting at rows [0, rows - 1)."""
        return len(self.data)

    def window(self, row, length):
        """(inputs, targets) of this rank's streams for the window at ``row``."""
        return get_batch(self.data, row, length)

    def zero(self):
        """Every stream starts from the zero state (an epoch's start; after a non-finite step)."""
        self.state = self.model.init_state(self.hi - self.lo)

    def reset_some(self, rng, prob):
        """Zero each stream's state with probability ``prob``, drawn for every stream of every rank, so the
        draws do not depend on the number of ranks."""
        resets = rng.random(self.batch_size) < prob
        reset_streams(self.state, resets[self.lo : self.hi])

    def part_state(self, a, b):
        return self.state if len(self.parts) == 1 else [tuple(s[a:b] for s in layer) for layer in self.state]

    def add_gradients(self, part):
        """With several parts, add the model's gradients of ``part`` to their sum."""
        if self.grad_sum is None:
            return
        if part == 0:
            self.grad_sum[...] = self.model.store.grad
        else:
            self.grad_sum += self.model.store.grad

    def gradients_into(self, grad):
        """With several parts, their summed gradients into ``grad`` (the gradient buffer)."""
        if self.grad_sum is not None:
            grad[...] = self.grad_sum

    def carry(self, new_states):
        """The parts' states after the window (one per part) become the streams' state."""
        if len(new_states) == 1:
            self.state = new_states[0]
            return
        for (a, b), new_state in zip(self.parts, new_states):
            for layer, new_layer in zip(self.state, new_state):
                for s, s_new in zip(layer, new_layer):
                    s[a:b] = s_new

    def state_dict(self):
        """Every rank's carried state, in stream order, on rank 0 (a collective); None elsewhere."""
        carried = self.world.gather([[to_numpy(s) for s in layer] for layer in self.state])
        if not self.world.is_main:
            return None
        names = self.model.state_names
        arrays = {
            f"{i}.{n}": np.concatenate([c[i][j] for c in carried])
            for i in range(len(self.state))
            for j, n in enumerate(names)
        }
        return {"arrays": arrays, "scalars": {}}

    def load_state_dict(self, state):
        """Each rank takes its streams' states: with another number of ranks the streams are the same, only
        their owners change."""
        for i, layer in enumerate(self.state):
            for n, s in zip(self.model.state_names, layer):
                s[...] = state["arrays"][f"{i}.{n}"][self.lo : self.hi]
