"""What a run does about non-finite steps: skip each one; after ``train.max_bad_steps`` in a row, go back
to the last checkpoint at a lower learning rate (``train.bad_step_lr_factor``); after MAX_RECOVERIES such
reloads, or without a factor, stop with an error.  The counters live in the run's Progress."""

import math

from lmtrain.world import CollectiveError

MAX_RECOVERIES = 5  # reloads after divergence before a run gives up


class Divergence:
    def __init__(self, train_cfg):
        self.max_bad_steps, self.lr_factor = train_cfg.max_bad_steps, train_cfg.bad_step_lr_factor

    def bad_step(self, progress, result):
        """Count a skipped step (``result``: its StepResult); returns what to print."""
        progress.bad_in_row += 1
        progress.bad_total += 1
        what = "loss" if not math.isfinite(result.loss) else "gradient norm"
        return f"step {progress.step}: non-finite {what}, update skipped ({progress.bad_in_row} in a row)"

    def must_reload(self, progress):
        """Whether the run goes back to its last checkpoint now; raises when it must stop instead."""
        if progress.bad_in_row < self.max_bad_steps:
            return False
        if not self.lr_factor:
            raise CollectiveError(
                f"training diverged: {progress.bad_in_row} non-finite steps in a row at step "
                f"{progress.step}; lower train.lr, or set train.bad_step_lr_factor to recover "
                f"automatically",
                exit_code=1,
            )
        if progress.recoveries >= MAX_RECOVERIES:
            raise CollectiveError(
                f"training diverged again after {progress.recoveries} recoveries (step "
                f"{progress.step}); lower train.lr",
                exit_code=1,
            )
        return True

    def reloaded(self, progress, before, schedule):
        """After the reload: the counters carried over from ``before`` (the Progress that diverged), one more
        recovery, and the learning rate lowered."""
        progress.recoveries, progress.bad_total = before.recoveries + 1, before.bad_total
        schedule.lr *= self.lr_factor
