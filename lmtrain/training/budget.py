"""A run's clock, and ``train.time_budget``: stop training in time for the final evaluation and saving.

The budget covers the whole ``lmtrain fit`` command, evaluations included
and earlier sessions of a resumed run too.  Training may use what is left
after the final validation and test, forecast from the last validation's
duration (before the first one, from the training speed: a forward pass
alone runs about three times as fast as training).

A budget in minutes makes the result depend on the machine: a faster one
trains more steps in the same time, and a cosine or linear schedule that
follows the clock gives each step a different rate from one run to the
next.  Presets
whose results the docs quote therefore count steps or epochs; the budget is
for users and for the speedrun, whose point is the clock.
"""

import time


class TimeBudget:
    def __init__(self, minutes, valid_tokens, test_tokens):
        self.minutes = minutes
        self.valid_tokens, self.eval_tokens = valid_tokens, valid_tokens + test_tokens
        self.start = time.perf_counter()
        self.before = 0.0  # seconds of the run's earlier sessions (resume)
        self.eval_seconds = None  # duration of the last validation
        self.session_tokens = 0  # tokens trained since this process started

    def resumed(self, seconds_before):
        """The run's earlier sessions took ``seconds_before``: the clock continues from there."""
        self.before = seconds_before

    def trained(self, tokens):
        self.session_tokens += tokens

    def validated(self, seconds):
        """A validation took ``seconds``: the forecast of the final evaluation follows it."""
        self.eval_seconds = seconds

    def elapsed(self):
        """Seconds the run has taken, earlier sessions included."""
        return self.before + time.perf_counter() - self.start

    def training_seconds(self):
        """Of the budget, what training may use: the rest is kept for validation, test and saving."""
        if self.eval_seconds is not None:
            final = self.eval_seconds * self.eval_tokens / self.valid_tokens
        elif self.session_tokens:
            rate = self.session_tokens / max(time.perf_counter() - self.start, 1e-3)
            final = self.eval_tokens / (3 * rate)
        else:
            final = 0.0
        return 60 * self.minutes - 1.2 * final - 5.0

    def fraction_used(self):
        """How much of the training time is used up (>= 1: stop); 0 without a budget."""
        if self.minutes is None:
            return 0.0
        return self.elapsed() / max(self.training_seconds(), 1e-9)
