"""Where a run is, and the partial sums it will log; and the random generators it draws from.  Both go
into every checkpoint, so a resumed run continues exactly."""

import dataclasses
import math
from typing import Optional

import numpy as np


@dataclasses.dataclass
class Progress:
    epoch: int = 1
    pos: int = 0  # row of the training stream where the next window starts
    step: int = 0  # windows processed (skipped ones included)
    interval_loss: float = 0.0  # sums since the last "train" log line
    interval_tokens: int = 0
    epoch_loss: float = 0.0  # sums since the start of the epoch
    epoch_tokens: int = 0
    best_valid_ppl: float = math.inf
    valid_ppl: Optional[float] = None  # of the latest validation
    bad_in_row: int = 0  # non-finite steps (lmtrain/training/divergence.py)
    bad_total: int = 0
    recoveries: int = 0

    def count(self, tokens, loss):
        """Move past a window of ``tokens`` tokens (counting rows x streams) and add its loss (None: the step
        was skipped) to the logged sums."""
        self.step += 1
        if loss is not None:
            self.bad_in_row = 0
            self.interval_loss += loss * tokens
            self.interval_tokens += tokens
            self.epoch_loss += loss * tokens
            self.epoch_tokens += tokens

    def summary(self):
        """What a checkpoint says of itself: the epochs its weights were trained through (the current one
        when saved inside it), its step, and its validation perplexities."""
        return {
            "epoch": self.epoch - 1 if self.pos == 0 else self.epoch,
            "step": self.step,
            "metrics": {"best_valid_ppl": self.best_valid_ppl, "valid_ppl": self.valid_ppl},
        }

    def state_dict(self):
        return {"arrays": {}, "scalars": dataclasses.asdict(self)}

    def load_state_dict(self, state):
        for key, value in state["scalars"].items():
            setattr(self, key, value)


def rank_dropout_rng(seed, rank):
    """Rank r's own dropout generator (rank 0's is the model's, as in a single process)."""
    return np.random.default_rng([seed, 1, rank])


class Generators:
    """The run's random generators: dropout (the model's; each rank draws for its own streams), state resets
    and window lengths (drawn alike on every rank: they concern every stream)."""

    def __init__(self, seed, dropout_rng, world):
        self.seed, self.world = seed, world
        self.rngs = {
            "dropout": dropout_rng,
            "reset": np.random.default_rng([seed, 2]),
            "bptt": np.random.default_rng([seed, 3]),
        }
        if world.rank:
            self.rngs["dropout"].bit_generator.state = rank_dropout_rng(seed, world.rank).bit_generator.state

    def __getitem__(self, name):
        return self.rngs[name]

    def state_dict(self):
        """Rank 0's generators and every other rank's dropout generator, on rank 0 (a collective)."""
        dropout = self.world.gather(self.rngs["dropout"].bit_generator.state)
        if not self.world.is_main:
            return None
        return {
            "arrays": {},
            "scalars": {
                "rng": {k: g.bit_generator.state for k, g in self.rngs.items()},
                "rank_dropout_rng": dropout[1:],
            },
        }

    def load_state_dict(self, state):
        """Ranks the checkpoint did not have start new dropout generators."""
        scalars = state["scalars"]
        for k, g in self.rngs.items():
            g.bit_generator.state = scalars["rng"][k]
        r = self.world.rank
        if r:
            others = scalars.get("rank_dropout_rng", [])
            self.rngs["dropout"].bit_generator.state = (
                others[r - 1] if r - 1 < len(others) else rank_dropout_rng(self.seed, r).bit_generator.state
            )
