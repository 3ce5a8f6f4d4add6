"""A training run: truncated BPTT with clipping, on one process or on the ranks of an MPI job.

The loop reads the next window of every stream, makes one step (lmtrain/training/step.py: forward and
backward on this rank's streams, the gradients summed over the ranks, clipped, one update), logs, and
after each epoch validates and keeps the best checkpoint.  Around it, parts that each own their state:
the streams and their carried state (streams.py), run control (control.py: signals, the time budget, when
to save), divergence recovery (divergence.py), the checkpointer (checkpointer.py), the progress and the
random generators (progress.py).  Everything the ranks must agree on is decided from values they share,
at a step boundary.

A run can stop at any step and continue exactly: a checkpoint holds the parameters, the optimizer and
schedule state, the position in the data, the carried hidden state of every stream, every random
generator and the partial sums of the losses being logged.  Resuming replays nothing and skips nothing,
so the logged training losses are the same, to the bit, as an uninterrupted run's.
"""

import dataclasses
import os
import signal
import time

from tqdm import tqdm

from lmtrain.build import build_model, build_optimizer
from lmtrain.evaluation import evaluate
from lmtrain.optim import LRSchedule
from lmtrain.run_dir import MetricsLog
from lmtrain.training.budget import TimeBudget
from lmtrain.training.checkpointer import Checkpointer
from lmtrain.training.control import Interrupted, RunControl, check_in_sync
from lmtrain.training.divergence import Divergence
from lmtrain.training.log import RunLog
from lmtrain.training.progress import Generators, Progress
from lmtrain.training.step import train_step
from lmtrain.training.streams import Streams, window_length
from lmtrain.world import World


class Run:
    def __init__(self, cfg, run_dir, corpus, world=World(), quiet=False, echo=print, resume_hint=""):
        self.cfg, self.t, self.corpus, self.world = cfg, cfg.train, corpus, world
        t = cfg.train
        self.quiet = quiet or not world.is_main
        self.say = (lambda *a, **k: None) if self.quiet else echo
        self.resume_hint = resume_hint
        self.metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
        self.model = build_model(cfg.model, len(corpus.vocab), seed=cfg.seed, dtype=t.dtype, kernels=t.kernels)
        world.broadcast_array(self.model.store.data)  # every rank starts from rank 0's parameters
        self.model.set_regularization(t.ar, t.tar)
        self.optimizer = build_optimizer(t, self.model)
        self.schedule = LRSchedule(t)
        self.generators = Generators(cfg.seed, self.model.dropout_rng, world)
        self.streams = Streams(corpus.train, t.batch_size, t.accumulate, self.model, world)
        self.p = Progress()
        self.budget = TimeBudget(t.time_budget, len(corpus.valid), len(corpus.test))
        self.control = RunControl(t, world, self.budget, echo)
        self.divergence = Divergence(t)
        self.log = RunLog(self.metrics, world, self.p, self.budget, self.say)
        parts = dict(
            progress=self.p,
            schedule=self.schedule,
            optimizer=self.optimizer,
            streams=self.streams,
            generators=self.generators,
        )
        self.checkpoints = Checkpointer(
            os.path.join(run_dir, "checkpoints"), world, cfg, corpus.vocab, parts, keep_last=t.keep_last
        )

    def save(self, name):
        path = self.checkpoints.save(name)
        self.control.saved()
        return path

    def restore(self, ckpt):
        self.checkpoints.restore(self.model, ckpt)

    # -- the loop -------------------------------------------------------------
    def run(self):
        t = self.t
        with self.control.signals:
            while self.p.epoch <= t.epochs and not self.control.out_of_steps(self.p.step):
                finished = self.train_epoch()
                if finished:
                    self.end_epoch()
            if self.control.stopped_by_budget:  # whether it ran out mid-epoch or during a closing validation
                self.log.event("time_budget", budget_minutes=t.time_budget)
                self.say(f"time budget of {t.time_budget:g} min reached at step {self.p.step}: evaluating and saving")
            result = self.final_test()
            signum = self.control.after_evaluation()
            if signum:  # it came during the last validation or the test, which a signal does not cut short
                raise Interrupted(
                    f"stopped by {signal.Signals(signum).name} at the end of the run (step "
                    f"{self.p.step}), after its final evaluation; its checkpoints are complete",
                    exit_code=128 + signum,
                )
            return result

    def train_epoch(self):
        """Train from the current position to the end of the epoch (or max_steps, the budget, a signal);
        returns whether the epoch's end was reached without a divergence recovery."""
        t, p, streams = self.t, self.p, self.streams
        if p.pos == 0:
            streams.zero()
        self.log.start_interval()
        with tqdm(
            total=streams.rows - 1,
            initial=p.pos,
            desc=f"epoch {p.epoch}/{t.epochs}",
            unit="tok/stream",
            disable=True if self.quiet else None,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            while p.pos < streams.rows - 1 and not self.control.out_of_steps(p.step):
                x, y = streams.window(p.pos, window_length(t, self.generators["bptt"]))
                lr = self.schedule.at(p.step, self.control.fraction_done(p.step, (streams.rows - 2) // t.bptt + 1))
                if t.variable_bptt:  # a longer window sums more steps: keep the per-token rate
                    lr *= len(x) / t.bptt
                if t.state_reset_prob:
                    streams.reset_some(self.generators["reset"], t.state_reset_prob)
                result = train_step(self.model, self.optimizer, streams, x, y, lr, t.clip_grad_norm, self.world)
                self.budget.trained(len(x) * t.batch_size)
                p.pos += len(x)
                p.count(len(x) * t.batch_size, result.loss if result.updated else None)
                bar.update(len(x))
                if not result.updated and self.bad_step(result, lr):
                    return False  # recovered: the loop continues from the checkpoint's position
                if p.step % t.log_every == 0 and p.interval_tokens:
                    self.log.train(lr, result.grad_norm, bar)
                self.after_step()
        return True

    def after_step(self):
        """The ranks' decisions after a step: stop for a signal (saving first), save a periodic checkpoint."""
        signum, save = self.control.after_step(self.p.step)
        if self.t.check_sync_every and self.p.step % self.t.check_sync_every == 0:
            check_in_sync(self.world, self.model.store, self.p.step)
        if save:
            self.save_periodic()
        if signum:
            path = self.save("last.npz")
            raise Interrupted(
                f"stopped by {signal.Signals(signum).name} at step {self.p.step}; checkpoint saved to "
                f"{path}; resume with: {self.resume_hint or 'lmtrain fit CONFIG --resume'}",
                exit_code=128 + signum,
            )

    def save_periodic(self):
        self.checkpoints.save_periodic(self.p.step)
        self.control.saved()

    def bad_step(self, result, lr):
        """A skipped step: the streams start afresh (the state that produced a non-finite value must not be
        carried on); after too many in a row, back to the last checkpoint at a lower rate.  Returns True when
        the run was moved back."""
        self.streams.zero()
        self.log.bad_step(result, lr, self.divergence.bad_step(self.p, result))
        if not self.divergence.must_reload(self.p):
            return False
        before = dataclasses.replace(self.p)
        ckpt = self.checkpoints.load("last.npz")
        self.restore(ckpt)
        self.divergence.reloaded(self.p, before, self.schedule)
        self.log.event("recover", split="train", lr=self.schedule.lr, from_step=ckpt.meta["step"])
        self.say(
            f"reloaded the checkpoint of step {ckpt.meta['step']}; learning rate lowered to {self.schedule.lr:.4g}"
        )
        return True

    def end_epoch(self):
        """Validate, keep the best checkpoint, step the schedule, move to the next epoch."""
        t, p = self.t, self.p
        complete = p.pos >= self.streams.rows - 1  # False when max_steps stopped it inside the epoch
        start = time.perf_counter()
        with self.optimizer.averaged():
            v = evaluate(self.model, self.corpus.valid, t.eval_batch_size, t.bptt, self.world)
        seconds = time.perf_counter() - start
        self.control.after_validation(seconds)
        lr = self.schedule.at(p.step, self.control.fraction_done(p.step, (self.streams.rows - 2) // t.bptt + 1))
        improved = v.ppl < p.best_valid_ppl
        self.log.valid(v, seconds, lr, improved)
        p.best_valid_ppl, p.valid_ppl = min(p.best_valid_ppl, v.ppl), v.ppl
        reason = self.optimizer.observe_validation(v.loss, p.epoch if complete else p.epoch - 1)
        if reason:
            self.log.event("switch_to_averaging", lr=lr, reason=reason)
            self.say(f"{reason}: averaging the weights from step {p.step} on")
        if complete:
            self.schedule.epoch_end(p.epoch, v.ppl)
            p.epoch += 1
            p.pos = 0
            p.epoch_loss, p.epoch_tokens = 0.0, 0
        if improved:
            self.save("best.npz")
        self.save_periodic()

    def final_test(self):
        """Test perplexity of the saved best checkpoint: what `lmtrain eval` computes from the file."""
        t = self.t
        best = self.checkpoints.load("best.npz")
        self.model.load_params(best.params)
        start = time.perf_counter()
        test = evaluate(self.model, self.corpus.test, t.eval_batch_size, t.bptt, self.world)
        self.log.test(best, test, time.perf_counter() - start)
        return {
            "valid_ppl": self.p.best_valid_ppl,
            "test_ppl": test.ppl,
            "test_loss": test.loss,
            "steps": self.p.step,
            "bad_steps": self.p.bad_total,
            "elapsed_s": self.budget.elapsed(),
        }
