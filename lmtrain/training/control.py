"""Run control: what the ranks decide together after every step (stop for a signal, stop for the time
budget, write a periodic checkpoint), from values they share, at a step boundary; and the signals."""

import os
import signal
import time
import zlib

from lmtrain.backend import to_numpy
from lmtrain.world import CollectiveError


class Interrupted(CollectiveError):
    """SIGINT or SIGTERM: the run saved a resumable checkpoint and stops (exit 128 + signal)."""


class StopSignals:
    """First SIGINT/SIGTERM: ask the loop to stop after the current step.  Second: leave at once.

    A SIGTERM again within ECHO seconds is the first one arriving twice, not a second request: a job scheduler
    (Slurm, systemd) signals every process of the job, and under MPI the supervising process passes its copy
    on to the rank it supervises (lmtrain/world.py), which then has two.  Ctrl-C reaches a rank once (the
    rank leaves the launcher's process group), so a second SIGINT always means "now"."""

    ECHO = 1.0

    def __init__(self, echo):
        self.echo = echo
        self.signum = None
        self.previous = {}
        self.received = 0.0

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == self.signum == signal.SIGTERM and time.monotonic() - self.received < self.ECHO:
                return
            # The checkpoints on disk are complete (writes are atomic); leave them as they are.
            os._exit(128 + signum)
        self.signum, self.received = signum, time.monotonic()
        self.echo(
            f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(press Ctrl-C again to quit at once)"
        )

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a library): no handlers
                pass
        return self

    def __exit__(self, *exc):
        if self.signum is not None:  # stopping: the handlers stay, so that the signal's echo still counts once
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RunControl:
    """When the run stops and when it saves, decided from rank 0's clock and every rank's signals."""

    def __init__(self, train_cfg, world, budget, echo):
        self.t, self.world, self.budget = train_cfg, world, budget
        self.signals = StopSignals(echo if world.is_main else (lambda *a, **k: None))
        self.used = 0.0  # fraction of the time budget used, as rank 0 measured it at the last step
        self.stopped_by_budget = False
        self.last_save = time.perf_counter()

    def after_step(self, step):
        """The decisions of every rank after step ``step``: (signal number or 0, whether to save)."""
        main = self.world.is_main
        signum, used, save_due = self.world.max(
            [self.signals.signum or 0, self.budget.fraction_used() if main else 0.0, main and self._save_due(step)]
        )
        self.used = used
        if self.t.time_budget is not None and used >= 1.0:
            self.stopped_by_budget = True
        return int(signum), bool(save_due) and not signum

    def after_evaluation(self):
        """A signal received during the run's last evaluations, decided by every rank: its number or 0."""
        return int(self.world.max([self.signals.signum or 0])[0])

    def after_validation(self, seconds):
        """A validation took ``seconds``; stop if the budget has no room left for another epoch's work."""
        self.budget.validated(seconds)
        if (
            self.t.time_budget is not None
            and self.world.agree(self.world.is_main and self.budget.fraction_used() >= 1)[0]
        ):
            self.stopped_by_budget = True

    def _save_due(self, step):
        t = self.t
        by_steps = t.checkpoint_every is not None and step % t.checkpoint_every == 0
        by_time = t.checkpoint_minutes is not None and time.perf_counter() - self.last_save >= 60 * t.checkpoint_minutes
        return by_steps or by_time

    def saved(self):
        self.last_save = time.perf_counter()

    def out_of_steps(self, step):
        """True when max_steps is reached or the time budget leaves only what the final evaluation needs."""
        return (self.t.max_steps is not None and step >= self.t.max_steps) or self.stopped_by_budget

    def fraction_done(self, step, windows_per_epoch):
        """Fraction of the run done, for the cosine and linear schedules: by steps, or by time under a budget."""
        t = self.t
        by_steps = step / (t.max_steps or t.epochs * windows_per_epoch)
        return by_steps if t.time_budget is None else max(by_steps, self.used)


def check_in_sync(world, store, step):
    """Debug check (train.check_sync_every): every rank holds the same parameters."""
    crc = zlib.crc32(to_numpy(store.data).tobytes())
    high, low = world.max([crc, -crc])
    if high != -low:
        raise CollectiveError(
            f"the ranks' parameters differ at step {step}; this is a bug, please report it with the config", exit_code=1
        )
