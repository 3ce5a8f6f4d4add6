"""One training step: the window's forward and backward, the gradients summed over the ranks, clipped by
their global norm, one update."""

import math
from typing import NamedTuple

from lmtrain.backend import xp
from lmtrain.optim import clip_scale, grad_norm


class StepResult(NamedTuple):
    loss: float  # mean NLL over the whole batch (every rank's streams)
    grad_norm: float  # the global L2 norm of the gradients, before clipping
    updated: bool  # False: a non-finite loss or norm (on any rank) skipped the update on all


def train_step(model, optimizer, streams, x, y, lr, clip_grad_norm, world):
    """One optimizer step on the window (x, y) of this rank's ``streams``."""
    # 1. forward and backward on each micro-batch (one, unless train.accumulate > 1), gradients summed
    total = count = 0.0
    new_states = []
    for k, (a, b) in enumerate(streams.parts):
        out, new_state = model.forward(xp.asarray(x[:, a:b]), streams.part_state(a, b), train=True)
        loss = model.loss(out, xp.asarray(y[:, a:b]))
        total, count = total + loss.total, count + loss.count
        new_states.append(new_state)
        if math.isfinite(loss.mean):
            model.backward()
            streams.add_gradients(k)
    # 2. the loss and the gradients summed over the ranks: one Allreduce (a no-op in a single process)
    total, count = world.sum([total, count])
    if not math.isfinite(total / count):
        return StepResult(total / count, math.nan, False)
    streams.gradients_into(model.store.grad)
    world.allreduce(model.store.grad)
    # 3. the global norm; the buffer holds the sum of ranks x parts mean gradients of equal token counts
    scale = 1.0 / (world.size * len(streams.parts))
    norm = grad_norm(model.store) * scale
    if not math.isfinite(norm):
        return StepResult(total / count, norm, False)
    # 4. one update, with clipping folded in (one pass over the buffers, not two); the state carries on
    optimizer.step(lr, clip_scale(norm, clip_grad_norm) * scale)
    streams.carry(new_states)
    return StepResult(total / count, norm, True)
