"""The training loop: truncated BPTT with clipping, on one process or on the ranks of an MPI job.

One step reads the next window of every stream (``get_batch``), runs
forward and backward on this rank's streams, sums the gradients over the
ranks (one Allreduce; a single process is a world of size 1, where that is a
no-op), clips them by their global norm and updates the parameters, which
stay identical on every rank.  Everything a rank must agree on (stop for a
signal or the time budget, skip a non-finite step, save a checkpoint) is
decided from values the ranks share, at a step boundary.

A run can stop at any step and continue exactly: a checkpoint holds the
parameters, the optimizer and schedule state, the position in the data, the
carried hidden state of every stream, every random generator and the partial
sums of the losses being logged.  Resuming replays nothing and skips
nothing, so the logged training losses are the same, to the bit, as an
uninterrupted run's.
"""
import dataclasses
import glob
import math
import os
import signal
import socket
import time
import zlib

import numpy as np
from tqdm import tqdm

from lmtrain.backend import kernels_in_use, to_numpy, xp
from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.config import SAFE_TO_CHANGE_ON_RESUME
from lmtrain.data.batching import batchify, eval_streams, get_batch, window_starts
from lmtrain.data.sources import load_corpus
from lmtrain.data.vocab import Vocab
from lmtrain.errors import LmtrainError
from lmtrain.nn.adaptive import check_cutoffs
from lmtrain.nn.model import LanguageModel
from lmtrain.optim import LRSchedule, averaging_start, clip_scale, grad_norm, make_optimizer
from lmtrain.run_dir import MetricsLog, config_changes, prepare_run_dir, write_run_files
from lmtrain.time_budget import TimeBudget
from lmtrain.world import CollectiveError, World

MAX_RECOVERIES = 5  # reloads after divergence before a run gives up


def perplexity(loss):
    return math.exp(min(loss, 700.0))


def evaluate(model, ids, batch_size, bptt=35, world=World()):
    """(mean NLL, perplexity, targets counted) over a whole split, state carried throughout.

    With several ranks, each reads its block of the streams and the sums are
    added, so the result is the single process's.
    """
    data, weights = eval_streams(ids, batch_size)
    lo, hi = world.shard(batch_size)
    total = count = 0.0
    if hi > lo:
        data, weights = data[:, lo:hi], weights[:, lo:hi]
        state = model.init_state(hi - lo)
        for n, i in enumerate(window_starts(data, bptt)):
            x, y = get_batch(data, i, bptt)
            logits, state = model.forward(xp.asarray(x), state, train=False, same_weights=n > 0)
            model.loss(logits, xp.asarray(y), xp.asarray(weights[i:i + len(y)]), grad=False)
            total += model.loss_sum
            count += model.loss_count
    total, count = world.sum([total, count])
    loss = total / count
    return loss, perplexity(loss), int(count)


def reset_streams(state, which):
    """Zero the carried (h, c) of the streams (batch columns) selected by a boolean mask."""
    if which.any():
        for layer in state:
            for s in layer:
                s[which] = 0


class Interrupted(CollectiveError):
    """SIGINT or SIGTERM: the run saved a resumable checkpoint and stops (exit 128 + signal)."""


@dataclasses.dataclass
class Progress:
    """Where a run is, and the partial sums it will log: all of it goes into every checkpoint."""
    epoch: int = 1
    pos: int = 0                 # row of the training stream where the next window starts
    step: int = 0                # windows processed (skipped ones included)
    interval_loss: float = 0.0   # sums since the last "train" log line
    interval_tokens: int = 0
    epoch_loss: float = 0.0      # sums since the start of the epoch
    epoch_tokens: int = 0
    best_valid_ppl: float = math.inf
    bad_in_row: int = 0
    bad_total: int = 0
    recoveries: int = 0


class StopSignals:
    """First SIGINT/SIGTERM: ask the loop to stop after the current step.  Second: leave at once."""

    def __init__(self, echo):
        self.echo = echo
        self.signum = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            # The checkpoints on disk are complete (writes are atomic); leave them as they are.
            os._exit(128 + signum)
        self.signum = signum
        self.echo(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                  "(press Ctrl-C again to quit at once)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a library): no handlers
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def check_sizes(cfg, n_train, world):
    t = cfg.train
    B, T, K, N = t.batch_size, t.bptt, world.size, t.accumulate
    if B % (K * N):
        raise LmtrainError(f"train.batch_size {B} must divide by the {K} rank{'s' if K > 1 else ''} times "
                           f"train.accumulate {N}: each rank reads an equal share of the streams")
    per_stream = n_train // B
    if per_stream < 2:
        raise LmtrainError(f"train.batch_size {B} is too large: the training split has {n_train} "
                           f"tokens, fewer than 2 per stream")
    if T > per_stream - 1:
        raise LmtrainError(f"train.bptt {T} is longer than the {per_stream - 1} steps each of the {B} "
                           f"training streams has; lower train.bptt or train.batch_size")


class Trainer:
    def __init__(self, cfg, run_dir, corpus, world=World(), quiet=False, echo=print, resume_hint=""):
        self.cfg, self.run_dir, self.corpus, self.world = cfg, run_dir, corpus, world
        self.t = t = cfg.train
        self.quiet = quiet or not world.is_main
        self.say = (lambda *a, **k: None) if self.quiet else echo
        self.echo = echo
        self.resume_hint = resume_hint
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
        self.model = LanguageModel(cfg.model, len(corpus.vocab), seed=cfg.seed, dtype=t.dtype)
        world.broadcast_array(self.model.store.data)  # every rank starts from rank 0's parameters
        self.optimizer = make_optimizer(t, self.model.store)
        self.schedule = LRSchedule(t)
        self.model.set_regularization(t.ar, t.tar)
        # Dropout masks differ per rank (each draws for its own streams); the state resets and
        # window lengths concern every stream and are drawn alike on every rank.
        self.rngs = {"dropout": self.model.dropout_rng, "reset": np.random.default_rng([cfg.seed, 2]),
                     "bptt": np.random.default_rng([cfg.seed, 3])}
        if world.rank:
            self.rngs["dropout"].bit_generator.state = rank_dropout_rng(cfg.seed, world.rank).bit_generator.state
        self.lo, self.hi = world.shard(t.batch_size)
        self.train_data = batchify(corpus.train, t.batch_size)[:, self.lo:self.hi]  # a view of the (mapped) ids
        n = (self.hi - self.lo) // t.accumulate  # streams per forward pass
        self.micro_batches = [(k * n, (k + 1) * n) for k in range(t.accumulate)]
        self.grad_sum = xp.zeros_like(self.model.store.grad) if t.accumulate > 1 else None
        self.state = self.model.init_state(self.hi - self.lo)
        self.p = Progress()
        self.valid_ppl = None
        self.budget = TimeBudget(t.time_budget, len(corpus.valid), len(corpus.test))
        self.used = 0.0           # fraction of the time budget used, as rank 0 measured it at the last step
        self.stopped_by_budget = False
        self.last_save = time.perf_counter()

    def log(self, event, **fields):
        if self.world.is_main:
            self.metrics.write(event=event, epoch=self.p.epoch, step=self.p.step, elapsed_s=self.budget.elapsed(),
                               **fields)

    # -- checkpoints ----------------------------------------------------------
    def save(self, name):
        """Write a resumable checkpoint; a collective, since rank 0 writes what every rank holds."""
        world = self.world
        carried = world.gather([[to_numpy(s) for s in layer] for layer in self.state])
        dropout_rngs = world.gather(self.rngs["dropout"].bit_generator.state)
        if not world.is_main:
            return None
        names = self.model.state_names
        state = {f"{i}.{n}": np.concatenate([c[i][j] for c in carried]) for i in range(len(self.state))
                 for j, n in enumerate(names)}
        opt = self.optimizer.state_dict()
        meta = {
            "config": self.cfg.to_dict(), "vocab": self.corpus.vocab.to_dict(),
            # epochs the weights were trained through (the current one when saved inside it)
            "epoch": self.p.epoch - 1 if self.p.pos == 0 else self.p.epoch, "step": self.p.step,
            "metrics": {"best_valid_ppl": self.p.best_valid_ppl, "valid_ppl": self.valid_ppl},
            "progress": dataclasses.asdict(self.p),
            "schedule": self.schedule.state_dict(), "optimizer": opt["scalars"],
            "rng": {k: g.bit_generator.state for k, g in self.rngs.items()}, "world_size": world.size,
            "rank_dropout_rng": dropout_rngs[1:],
        }
        path = os.path.join(self.ckpt_dir, name)
        with self.optimizer.averaged():  # averaged SGD: the file's weights are the averaged ones
            save_checkpoint(path, self.model.params, meta, {"optim": opt["arrays"], "state": state})
        self.last_save = time.perf_counter()
        return path

    def save_periodic(self):
        self.save("last.npz")
        if self.t.keep_last:
            self.save(f"step-{self.p.step:08d}.npz")
            numbered = sorted(glob.glob(os.path.join(self.ckpt_dir, "step-*.npz"))) if self.world.is_main else []
            for old in numbered[:-self.t.keep_last]:
                os.remove(old)

    def restore(self, ckpt):
        """Continue from a checkpoint written by ``save`` (each rank takes its streams' states).

        With another number of ranks the streams are the same, only their
        owners change: the carried states are re-sharded exactly, and the
        ranks the checkpoint did not have start new dropout generators.
        """
        meta = ckpt.meta
        if "progress" not in meta:
            raise LmtrainError(f"{ckpt.path} cannot be resumed from (it has no training state)")
        self.model.load_params(ckpt.params)
        self.optimizer.load_state_dict({"arrays": ckpt.group("optim"), "scalars": meta["optimizer"]})
        self.schedule.load_state_dict(meta["schedule"])
        for k, g in self.rngs.items():
            g.bit_generator.state = meta["rng"][k]
        r = self.world.rank
        if r:
            others = meta.get("rank_dropout_rng", [])
            self.rngs["dropout"].bit_generator.state = (
                others[r - 1] if r - 1 < len(others) else rank_dropout_rng(self.cfg.seed, r).bit_generator.state)
        carried = ckpt.group("state")
        for i, layer in enumerate(self.state):
            for n, s in zip(self.model.state_names, layer):
                s[...] = carried[f"{i}.{n}"][self.lo:self.hi]
        self.p = Progress(**meta["progress"])

    # -- one step -------------------------------------------------------------
    def train_step(self, x, y, lr):
        """Forward and backward on this rank's streams of the window (x, y), gradients summed over the
        ranks, clipping by the global norm, one update.

        Returns the loss and gradient norm of the whole batch and whether the
        update was made: a non-finite loss or norm (on any rank) skips it on all.
        """
        t, world, model = self.t, self.world, self.model
        if t.state_reset_prob:  # drawn for every stream, so the draws do not depend on the ranks
            resets = self.rngs["reset"].random(t.batch_size) < t.state_reset_prob
            reset_streams(self.state, resets[self.lo:self.hi])
        loss_sum = count = 0.0
        new_states = []
        for k, (a, b) in enumerate(self.micro_batches):  # one, unless train.accumulate > 1
            state = self.state if len(self.micro_batches) == 1 else [tuple(s[a:b] for s in layer)
                                                                     for layer in self.state]
            logits, new_state = model.forward(xp.asarray(x[:, a:b]), state, train=True)
            local = model.loss(logits, xp.asarray(y[:, a:b]))
            loss_sum, count = loss_sum + model.loss_sum, count + model.loss_count
            new_states.append(new_state)
            if math.isfinite(local):
                model.backward()
                if self.grad_sum is not None:
                    if k == 0:
                        self.grad_sum[...] = model.store.grad
                    else:
                        self.grad_sum += model.store.grad
        loss_sum, count = world.sum([loss_sum, count])
        loss = loss_sum / count
        if not math.isfinite(loss):
            return loss, math.nan, False
        if self.grad_sum is not None:
            model.store.grad[...] = self.grad_sum
        world.allreduce(model.store.grad)
        # The buffer holds the sum of K x N per-pass mean gradients of equal token counts.
        scale = 1.0 / (world.size * len(self.micro_batches))
        norm = grad_norm(model.store) * scale
        if not math.isfinite(norm):
            return loss, norm, False
        # clipping is folded into the update: one pass over the buffers, not two
        self.optimizer.step(lr, clip_scale(norm, t.clip_grad_norm) * scale)
        if len(new_states) == 1:
            self.state = new_states[0]
        else:
            for (a, b), new_state in zip(self.micro_batches, new_states):
                for layer, new_layer in zip(self.state, new_state):
                    for s, s_new in zip(layer, new_layer):
                        s[a:b] = s_new
        return loss, norm, True

    def after_step(self, signals):
        """What the ranks decide together after every step, from rank 0's clock: stop for a signal (on any
        rank), stop for the time budget, write a periodic checkpoint.  Returns the signal number or 0."""
        main = self.world.is_main
        signum, used, save_due = self.world.max([
            signals.signum or 0, self.budget.fraction_used() if main else 0.0, main and self.periodic_save_due()])
        self.used = used
        if self.t.time_budget is not None and used >= 1.0:
            self.stopped_by_budget = True
        if self.t.check_sync_every and self.p.step % self.t.check_sync_every == 0:
            self.check_in_sync()
        if save_due and not signum:
            self.save_periodic()
        return int(signum)

    def check_in_sync(self):
        """Debug check (train.check_sync_every): every rank holds the same parameters."""
        crc = zlib.crc32(to_numpy(self.model.store.data).tobytes())
        high, low = self.world.max([crc, -crc])
        if high != -low:
            raise CollectiveError(f"the ranks' parameters differ at step {self.p.step}; this is a bug, please "
                                  f"report it with the config", exit_code=1)

    def bad_step(self, loss, norm, lr):
        """Count a skipped step; after max_bad_steps in a row, go back to the last checkpoint at a lower rate.

        Returns True when the run was moved back (to the checkpoint's position).
        """
        p, t = self.p, self.t
        p.bad_in_row += 1
        p.bad_total += 1
        # The state that produced a non-finite value must not be carried on.
        self.state = self.model.init_state(self.hi - self.lo)
        self.log("bad_step", split="train", loss=loss if math.isfinite(loss) else None, lr=lr,
                 grad_norm=norm if math.isfinite(norm) else None, bad_in_row=p.bad_in_row)
        self.say(f"step {p.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}, "
                 f"update skipped ({p.bad_in_row} in a row)")
        if p.bad_in_row < t.max_bad_steps:
            return False
        self.recover_from_divergence()
        return True

    def recover_from_divergence(self):
        """Reload last.npz and lower the learning rate by train.bad_step_lr_factor (or stop, after too many)."""
        p, t = self.p, self.t
        if not t.bad_step_lr_factor:
            raise CollectiveError(f"training diverged: {p.bad_in_row} non-finite steps in a row at step {p.step}; "
                                  f"lower train.lr, or set train.bad_step_lr_factor to recover automatically",
                                  exit_code=1)
        if p.recoveries >= MAX_RECOVERIES:
            raise CollectiveError(f"training diverged again after {p.recoveries} recoveries (step {p.step}); "
                                  f"lower train.lr", exit_code=1)
        recoveries, bad_total = p.recoveries + 1, p.bad_total
        ckpt = self.world.on_main(lambda: load_checkpoint(os.path.join(self.ckpt_dir, "last.npz")))
        self.restore(ckpt)
        self.p.recoveries, self.p.bad_total = recoveries, bad_total
        self.schedule.lr *= t.bad_step_lr_factor
        self.log("recover", split="train", lr=self.schedule.lr, from_step=ckpt.meta["step"])
        self.say(f"reloaded the checkpoint of step {ckpt.meta['step']}; learning rate lowered to "
                 f"{self.schedule.lr:.4g}")

    # -- the loop -------------------------------------------------------------
    def run(self):
        t = self.t
        with StopSignals(self.echo if self.world.is_main else (lambda *a, **k: None)) as signals:
            while self.p.epoch <= t.epochs and not self.out_of_steps():
                signum, finished = self.train_epoch(signals)
                if signum:
                    self.stop_for_signal(signum)
                if finished:
                    self.end_epoch()
            if self.stopped_by_budget:  # whether it ran out mid-epoch or during a closing validation
                self.log("time_budget", budget_minutes=t.time_budget)
                self.say(f"time budget of {t.time_budget:g} min reached at step {self.p.step}: "
                         f"evaluating and saving")
            return self.final_test()

    def out_of_steps(self):
        """True when max_steps is reached or the time budget leaves only what the final evaluation needs."""
        return (self.t.max_steps is not None and self.p.step >= self.t.max_steps) or self.stopped_by_budget

    def progress(self):
        """Fraction of the run done, for the cosine and linear schedules: by steps, or by time under a budget."""
        t = self.t
        windows = (len(self.train_data) - 2) // t.bptt + 1
        by_steps = self.p.step / (t.max_steps or t.epochs * windows)
        return by_steps if t.time_budget is None else max(by_steps, self.used)

    def window_length(self):
        """bptt, or with variable_bptt a length drawn as AWD-LSTM does."""
        t = self.t
        if not t.variable_bptt:
            return t.bptt
        rng = self.rngs["bptt"]
        base = t.bptt if rng.random() < 0.95 else t.bptt / 2
        return int(min(max(5, int(rng.normal(base, 5))), t.bptt + 20))

    def train_epoch(self, signals):
        """Train from the current position to the end of the epoch (or max_steps, the budget, a signal).

        Returns (signal number or 0, whether the epoch's end was reached without a divergence recovery).
        """
        t, p = self.t, self.p
        if p.pos == 0:
            self.state = self.model.init_state(self.hi - self.lo)
        self.interval_start = time.perf_counter()
        with tqdm(total=len(self.train_data) - 1, initial=p.pos, desc=f"epoch {p.epoch}/{t.epochs}",
                  unit="tok/stream", disable=True if self.quiet else None, leave=False, dynamic_ncols=True) as bar:
            while p.pos < len(self.train_data) - 1 and not self.out_of_steps():
                x, y = get_batch(self.train_data, p.pos, self.window_length())
                lr = self.schedule.at(p.step, self.progress())
                if t.variable_bptt:  # a longer window sums more steps: keep the per-token rate
                    lr *= len(x) / t.bptt
                loss, norm, ok = self.train_step(x, y, lr)
                self.count_step(len(x), loss if ok else None)
                bar.update(len(x))
                if not ok and self.bad_step(loss, norm, lr):
                    return 0, False  # recovered: the caller continues from the checkpoint's position
                if p.step % t.log_every == 0 and p.interval_tokens:
                    self.log_train(lr, norm, bar)
                signum = self.after_step(signals)
                if signum:
                    return signum, False
        return 0, True

    def count_step(self, rows, loss):
        """Move past a window of ``rows`` time steps and add its loss (None: skipped) to the logged sums."""
        p, tokens = self.p, rows * self.t.batch_size
        self.budget.session_tokens += tokens
        p.pos += rows
        p.step += 1
        if loss is not None:
            p.bad_in_row = 0
            p.interval_loss += loss * tokens
            p.interval_tokens += tokens
            p.epoch_loss += loss * tokens
            p.epoch_tokens += tokens

    def log_train(self, lr, norm, bar):
        """A "train" event with the mean loss since the last one, and the progress bar's figures."""
        p, now = self.p, time.perf_counter()
        mean = p.interval_loss / p.interval_tokens
        tps = p.interval_tokens / max(now - self.interval_start, 1e-9)
        self.log("train", split="train", loss=mean, ppl=perplexity(mean), lr=lr, tokens_per_s=tps, grad_norm=norm)
        bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{perplexity(mean):.1f}", lr=f"{lr:.3g}", tok_s=f"{tps:,.0f}",
                        refresh=False)
        p.interval_loss, p.interval_tokens = 0.0, 0
        self.interval_start = now

    def periodic_save_due(self):
        t = self.t
        by_steps = t.checkpoint_every is not None and self.p.step % t.checkpoint_every == 0
        by_time = (t.checkpoint_minutes is not None
                   and time.perf_counter() - self.last_save >= 60 * t.checkpoint_minutes)
        return by_steps or by_time

    def stop_for_signal(self, signum):
        path = self.save("last.npz")
        name = signal.Signals(signum).name
        raise Interrupted(f"stopped by {name} at step {self.p.step}; checkpoint saved to {path}; resume with: "
                          f"{self.resume_hint or 'lmtrain fit CONFIG --resume'}", exit_code=128 + signum)

    def end_epoch(self):
        """Validate, keep the best checkpoint, step the schedule, move to the next epoch."""
        t, p = self.t, self.p
        complete = p.pos >= len(self.train_data) - 1  # False when max_steps stopped it inside the epoch
        eval_start = time.perf_counter()
        with self.optimizer.averaged():
            v_loss, valid_ppl, v_count = evaluate(self.model, self.corpus.valid, t.eval_batch_size, t.bptt,
                                                  self.world)
        now = time.perf_counter()
        self.budget.eval_seconds = now - eval_start
        if t.time_budget is not None and self.world.agree(self.world.is_main and self.budget.fraction_used() >= 1)[0]:
            self.stopped_by_budget = True
        train_ppl = perplexity(p.epoch_loss / p.epoch_tokens) if p.epoch_tokens else None
        lr = self.schedule.at(p.step, self.progress())
        self.log("valid", split="valid", loss=v_loss, ppl=valid_ppl, lr=lr,
                 tokens_per_s=v_count / max(now - eval_start, 1e-9), tokens=v_count, train_ppl=train_ppl)
        improved = valid_ppl < p.best_valid_ppl
        p.best_valid_ppl = min(p.best_valid_ppl, valid_ppl)
        self.valid_ppl = valid_ppl
        self.say(f"epoch {p.epoch}: train ppl {train_ppl or math.nan:.2f} | valid ppl {valid_ppl:.2f}"
                 f"{' (best)' if improved else ''} | lr {lr:.4g} | {self.budget.elapsed():.0f}s")
        reason = self.optimizer.observe_validation(v_loss, p.epoch if complete else p.epoch - 1)
        if reason:
            self.log("switch_to_averaging", lr=lr, reason=reason)
            self.say(f"{reason}: averaging the weights from step {p.step} on")
        if complete:
            self.schedule.epoch_end(p.epoch, valid_ppl)
            p.epoch += 1
            p.pos = 0
            p.epoch_loss, p.epoch_tokens = 0.0, 0
        if improved:
            self.save("best.npz")
        self.save_periodic()

    def final_test(self):
        """Test perplexity of the saved best checkpoint: what `lmtrain eval` computes from the file."""
        t = self.t
        best = self.world.on_main(lambda: load_checkpoint(os.path.join(self.ckpt_dir, "best.npz")))
        self.model.load_params(best.params)
        eval_start = time.perf_counter()
        test_loss, test_ppl, test_count = evaluate(self.model, self.corpus.test, t.eval_batch_size, t.bptt,
                                                   self.world)
        now = time.perf_counter()
        if self.world.is_main:
            self.metrics.write(event="test", epoch=best.meta["epoch"], step=best.meta["step"], split="test",
                               loss=test_loss, ppl=test_ppl, tokens_per_s=test_count / max(now - eval_start, 1e-9),
                               elapsed_s=self.budget.elapsed(), tokens=test_count)
        self.say(f"test ppl {test_ppl:.2f} ({test_count:,} tokens) with the best checkpoint (step "
                 f"{best.meta['step']}, valid ppl {best.meta['metrics']['best_valid_ppl']:.2f}); "
                 f"{self.budget.elapsed():.0f}s in all")
        return {"valid_ppl": self.p.best_valid_ppl, "test_ppl": test_ppl, "test_loss": test_loss,
                "steps": self.p.step, "bad_steps": self.p.bad_total, "elapsed_s": self.budget.elapsed()}


def rank_dropout_rng(seed, rank):
    """Rank r's own dropout generator (rank 0's is the model's, as in a single process)."""
    return np.random.default_rng([seed, 1, rank])


def read_resume_checkpoint(path, cfg):
    """The checkpoint to resume from, refused when the config changes what it trained."""
    if not os.path.exists(path):
        raise LmtrainError(f"nothing to resume: {path} does not exist (start the run without --resume)")
    ckpt = load_checkpoint(path)
    unsafe, safe = config_changes(ckpt.meta["config"], cfg.to_dict())
    if unsafe:
        raise LmtrainError(f"cannot resume {path} with a different model or data: "
                           f"{'; '.join(unsafe)} (only {', '.join(sorted(SAFE_TO_CHANGE_ON_RESUME))} "
                           f"may change)")
    ckpt.changed = safe
    return ckpt


def fit(cfg, run_dir, overwrite=False, resume=None, quiet=False, echo=print, resume_hint="", world=World()):
    """Train as ``cfg`` says, writing everything into ``run_dir``; returns the final metrics.

    ``resume``: None to start afresh, "last" for the run's last.npz, or a
    checkpoint path.  ``world``: the ranks training together (see
    lmtrain.world); rank 0 reads the checkpoint and writes the run directory.
    Each set-up step either succeeds on every rank or fails on all of them.
    """
    say = (lambda *a, **k: None) if quiet or not world.is_main else echo
    ckpt = None
    if resume is not None:
        path = os.path.join(run_dir, "checkpoints", "last.npz") if resume == "last" else resume
        ckpt = world.on_main(lambda: read_resume_checkpoint(path, cfg))
    # rank 0 first: it downloads and caches; the others then find the files
    corpus = world.main_first(lambda: load_corpus(cfg.data, log=say))
    world.on_every_rank(lambda: check_sizes(cfg, len(corpus.train), world))
    if cfg.model.softmax == "adaptive":  # before the run directory is made, as the other checks
        world.on_every_rank(lambda: check_cutoffs(cfg.model.adaptive_cutoffs, len(corpus.vocab)))
    if ckpt is not None:
        world.on_every_rank(lambda: check_vocab(ckpt, corpus.vocab))

    def prepare():
        prepare_run_dir(run_dir, overwrite, resume is not None)
        write_run_files(run_dir, cfg, corpus.vocab)
    world.on_main(prepare)

    trainer = Trainer(cfg, run_dir, corpus, world=world, quiet=quiet, echo=echo, resume_hint=resume_hint)
    say(corpus.describe())
    say(f"model: {trainer.model.num_params():,} parameters; run directory {run_dir}; "
        f"element-wise kernels: {kernels_in_use()}")
    if averaging_start(cfg.train) != cfg.train.average_from:  # set, but no epoch after it to average
        say(f"note: train.average_from {cfg.train.average_from} is not below train.epochs {cfg.train.epochs}: "
            f"this run evaluates its last weights, not an average")
    if ckpt is None:
        trainer.save("last.npz")  # a run is resumable from its first step
    else:
        trainer.restore(ckpt)
        trainer.budget.before = world.broadcast(trainer.metrics.truncate_after(trainer.p.step)
                                                if world.is_main else None)
        moved = ckpt.meta.get("world_size", 1) != world.size
        trainer.log("resume", lr=trainer.schedule.lr, checkpoint=ckpt.path, changed=ckpt.changed,
                    world_size=world.size, **({"from_world_size": ckpt.meta.get("world_size", 1)} if moved else {}))
        say(f"resuming from {ckpt.path} at epoch {trainer.p.epoch}, step {trainer.p.step}"
            + (f" with {'; '.join(ckpt.changed)}" if ckpt.changed else "")
            + (f"; its {ckpt.meta.get('world_size', 1)} ranks' streams re-sharded over {world.size}"
               if moved else ""))
    if world.size > 1:  # which process is which rank: the launcher's messages name process ids
        ranks = world.gather([socket.gethostname(), os.getpid()])
        trainer.log("world", size=world.size, ranks=ranks, streams_per_rank=cfg.train.batch_size // world.size)
        say(f"{world.describe()}, {cfg.train.batch_size // world.size} streams each: "
            + ", ".join(f"rank {r} pid {pid} on {host}" for r, (host, pid) in enumerate(ranks or [])))
    return trainer.run()


def check_vocab(ckpt, vocab):
    if Vocab.from_dict(ckpt.meta["vocab"]) != vocab:
        raise LmtrainError(f"cannot resume {ckpt.path}: the corpus now gives a different vocabulary "
                           f"(were the data files changed?)")
