"""The training loop (truncated BPTT with clipping), evaluation, and everything that keeps a run safe.

A run can stop at any step and continue exactly: a checkpoint holds the
parameters, the optimizer and schedule state, the position in the data, the
carried hidden state, every random generator and the partial sums of the
losses being logged.  Resuming replays nothing and skips nothing, so the
logged training losses are the same, to the bit, as an uninterrupted run's.
"""
import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import time

import numpy as np
from tqdm import tqdm

from lmtrain.backend import to_numpy, xp
from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.config import SAFE_TO_CHANGE_ON_RESUME, dump_yaml, flatten
from lmtrain.data.batching import batchify, eval_streams
from lmtrain.data.sources import load_corpus
from lmtrain.data.vocab import Vocab
from lmtrain.errors import LmtrainError
from lmtrain.nn.cells import CELLS
from lmtrain.nn.model import LanguageModel
from lmtrain.optim import LRSchedule, clip_scale, grad_norm, make_optimizer

MAX_RECOVERIES = 5  # reloads after divergence before a run gives up


def perplexity(loss):
    return math.exp(min(loss, 700.0))


def evaluate(model, ids, batch_size, bptt=35):
    """(mean NLL, perplexity, targets counted) over a whole split, state carried throughout."""
    inputs, targets, weights = eval_streams(ids, batch_size)
    state = model.init_state(batch_size)
    total = count = 0.0
    for i in range(0, len(inputs), bptt):
        logits, state = model.forward(xp.asarray(inputs[i:i + bptt]), state, train=False)
        model.loss(logits, xp.asarray(targets[i:i + bptt]), xp.asarray(weights[i:i + bptt]))
        total += model.loss_sum
        count += model.loss_count
    loss = total / count
    return loss, perplexity(loss), int(count)


def reset_streams(state, which):
    """Zero the carried (h, c) of the streams (batch columns) selected by a boolean mask."""
    if which.any():
        for layer in state:
            for s in layer:
                s[which] = 0


class Interrupted(LmtrainError):
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


class MetricsLog:
    """metrics.jsonl: one JSON object per event, appended as it happens.

    Every event has at least the keys of FIELDS (None where they do not apply).
    """

    FIELDS = ("event", "epoch", "step", "split", "loss", "ppl", "lr", "tokens_per_s", "elapsed_s")

    def __init__(self, path):
        self.path = path

    def write(self, **event):
        record = {k: None for k in self.FIELDS}
        record.update(event)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step):
        """Drop events a resumed run will produce again (those after its checkpoint).

        Returns the elapsed time of the last event kept, so the resumed run's clock continues from it.
        """
        if not os.path.exists(self.path):
            return 0.0
        with open(self.path, encoding="utf-8") as fh:
            events = [json.loads(line) for line in fh if line.strip()]
        kept = [e for e in events if (e.get("step") or 0) <= step and e.get("event") != "test"]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(tmp, self.path)
        return max((e.get("elapsed_s") or 0.0 for e in kept), default=0.0)


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


def prepare_run_dir(run_dir, overwrite, resume):
    """Create the run directory; never reuse another run's without --resume or --overwrite."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    used = [p for p in ("metrics.jsonl", "checkpoints") if os.path.exists(os.path.join(run_dir, p))]
    if used and not (overwrite or resume):
        raise LmtrainError(f"run directory {run_dir} already holds a run ({used[0]}); pass --resume to continue "
                           f"it, --overwrite to replace it, or --run-dir to choose another")
    if used and overwrite:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as err:
        raise LmtrainError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    # leftovers of a write that was killed half-way
    for tmp in glob.glob(os.path.join(ckpt_dir, ".*.tmp-*")):
        os.remove(tmp)
    return ckpt_dir


def check_sizes(cfg, corpus):
    B, T = cfg.train.batch_size, cfg.train.bptt
    per_stream = len(corpus.train) // B
    if per_stream < 2:
        raise LmtrainError(f"train.batch_size {B} is too large: the training split has {len(corpus.train)} "
                           f"tokens, fewer than 2 per stream")
    if T > per_stream - 1:
        raise LmtrainError(f"train.bptt {T} is longer than the {per_stream - 1} steps each of the {B} "
                           f"training streams has; lower train.bptt or train.batch_size")


def config_changes(old, new):
    """(unsafe, safe) lists of 'key: old -> new' between two config dicts."""
    a, b = flatten(old), flatten(new)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            (safe if key in SAFE_TO_CHANGE_ON_RESUME else unsafe).append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return unsafe, safe


class Trainer:
    def __init__(self, cfg, run_dir, corpus, quiet=False, echo=print, resume_hint=""):
        self.cfg, self.run_dir, self.corpus = cfg, run_dir, corpus
        self.t = cfg.train
        self.quiet = quiet
        self.say = (lambda *a, **k: None) if quiet else echo
        self.echo = echo
        self.resume_hint = resume_hint
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
        self.model = LanguageModel(cfg.model, len(corpus.vocab), seed=cfg.seed, dtype=self.t.dtype)
        self.optimizer = make_optimizer(self.t, self.model.store)
        self.schedule = LRSchedule(self.t)
        self.model.set_regularization(self.t.ar, self.t.tar)
        self.rngs = {"dropout": self.model.dropout_rng, "reset": np.random.default_rng([cfg.seed, 2]),
                     "bptt": np.random.default_rng([cfg.seed, 3])}
        self.train_data = batchify(corpus.train, self.t.batch_size)
        self.state = self.model.init_state(self.t.batch_size)
        self.p = Progress()
        self.valid_ppl = None
        self.elapsed_before = 0.0  # training time of earlier sessions of this run
        self.start = time.perf_counter()
        self.last_save = time.perf_counter()
        self.eval_seconds = None  # duration of the last validation, to keep time for the final one
        self.session_tokens = 0   # tokens trained since this process started
        self.stopped_by_budget = False

    # -- checkpoints and log ------------------------------------------------
    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.start

    def log(self, event, **fields):
        self.metrics.write(event=event, epoch=self.p.epoch, step=self.p.step, elapsed_s=self.elapsed(), **fields)

    def save(self, name):
        """Write a resumable checkpoint; returns its path."""
        opt = self.optimizer.state_dict()
        names = CELLS[self.cfg.model.cell].state_names
        carried = {f"{i}.{n}": to_numpy(s) for i, layer in enumerate(self.state) for n, s in zip(names, layer)}
        meta = {
            "config": self.cfg.to_dict(), "vocab": self.corpus.vocab.to_dict(),
            # epochs the weights were trained through (the current one when saved inside it)
            "epoch": self.p.epoch - 1 if self.p.pos == 0 else self.p.epoch, "step": self.p.step,
            "metrics": {"best_valid_ppl": self.p.best_valid_ppl, "valid_ppl": self.valid_ppl},
            "progress": dataclasses.asdict(self.p),
            "schedule": self.schedule.state_dict(), "optimizer": opt["scalars"],
            "rng": {k: g.bit_generator.state for k, g in self.rngs.items()},
        }
        path = os.path.join(self.ckpt_dir, name)
        with self.optimizer.averaged():  # NT-ASGD: the file's weights are the averaged ones
            save_checkpoint(path, self.model.params, meta, {"optim": opt["arrays"], "state": carried})
        self.last_save = time.perf_counter()
        return path

    def save_periodic(self):
        self.save("last.npz")
        if self.t.keep_last:
            self.save(f"step-{self.p.step:08d}.npz")
            numbered = sorted(glob.glob(os.path.join(self.ckpt_dir, "step-*.npz")))
            for old in numbered[:-self.t.keep_last]:
                os.remove(old)

    def restore(self, ckpt):
        """Continue from a checkpoint written by ``save``."""
        meta = ckpt.meta
        if "progress" not in meta:
            raise LmtrainError(f"{ckpt.path} cannot be resumed from (it has no training state)")
        self.model.load_params(ckpt.params)
        self.optimizer.load_state_dict({"arrays": ckpt.group("optim"), "scalars": meta["optimizer"]})
        self.schedule.load_state_dict(meta["schedule"])
        for k, g in self.rngs.items():
            g.bit_generator.state = meta["rng"][k]
        carried = ckpt.group("state")
        names = CELLS[self.cfg.model.cell].state_names
        for i, layer in enumerate(self.state):
            for n, s in zip(names, layer):
                s[...] = carried[f"{i}.{n}"]
        self.p = Progress(**meta["progress"])

    # -- one window ---------------------------------------------------------
    def train_step(self, x, y, lr):
        """Forward, backward, clip, update; a non-finite loss or norm skips the update."""
        t = self.t
        if t.state_reset_prob:
            reset_streams(self.state, self.rngs["reset"].random(t.batch_size) < t.state_reset_prob)
        logits, new_state = self.model.forward(xp.asarray(x), self.state, train=True)
        loss = self.model.loss(logits, xp.asarray(y))
        norm = math.nan
        if math.isfinite(loss):
            self.model.backward()
            norm = grad_norm(self.model.store)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return loss, norm, False
        # clipping is folded into the update: one pass over the buffers, not two
        self.optimizer.step(lr, clip_scale(norm, t.clip_grad_norm))
        self.state = new_state
        return loss, norm, True

    def bad_step(self, loss, norm, lr):
        """Count a skipped step; after max_bad_steps in a row, reload the last checkpoint at a lower rate."""
        p, t = self.p, self.t
        p.bad_in_row += 1
        p.bad_total += 1
        # The state that produced a non-finite value must not be carried on.
        self.state = self.model.init_state(t.batch_size)
        self.log("bad_step", split="train", loss=loss if math.isfinite(loss) else None, lr=lr,
                 grad_norm=norm if math.isfinite(norm) else None, bad_in_row=p.bad_in_row)
        self.say(f"step {p.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}, "
                 f"update skipped ({p.bad_in_row} in a row)")
        if p.bad_in_row < t.max_bad_steps:
            return
        if not t.bad_step_lr_factor:
            raise LmtrainError(f"training diverged: {p.bad_in_row} non-finite steps in a row at step {p.step}; "
                               f"lower train.lr, or set train.bad_step_lr_factor to recover automatically",
                               exit_code=1)
        if p.recoveries >= MAX_RECOVERIES:
            raise LmtrainError(f"training diverged again after {p.recoveries} recoveries (step {p.step}); "
                               f"lower train.lr", exit_code=1)
        recoveries, bad_total = p.recoveries + 1, p.bad_total
        ckpt = load_checkpoint(os.path.join(self.ckpt_dir, "last.npz"))
        self.restore(ckpt)
        self.p.recoveries, self.p.bad_total = recoveries, bad_total
        self.schedule.lr *= t.bad_step_lr_factor
        self.log("recover", split="train", lr=self.schedule.lr, from_step=ckpt.meta["step"])
        self.say(f"reloaded the checkpoint of step {ckpt.meta['step']}; learning rate lowered to "
                 f"{self.schedule.lr:.4g}")

    # -- the loop -------------------------------------------------------------
    def run(self):
        t = self.t
        with StopSignals(self.echo) as signals:
            while self.p.epoch <= t.epochs and not self.out_of_steps():
                finished = self.train_epoch(signals)
                if signals.signum is not None:
                    self.stop_for_signal(signals.signum)
                if finished:
                    self.end_epoch()
            if self.stopped_by_budget:  # whether it ran out mid-epoch or during a closing validation
                self.log("time_budget", budget_minutes=t.time_budget)
                self.say(f"time budget of {t.time_budget:g} min reached at step {self.p.step}: "
                         f"evaluating and saving")
            return self.final_test()

    def out_of_steps(self):
        """True when max_steps is reached or the time budget leaves only what the final evaluation needs."""
        if self.t.max_steps is not None and self.p.step >= self.t.max_steps:
            return True
        if self.t.time_budget is not None and not self.stopped_by_budget:
            self.stopped_by_budget = self.elapsed() >= self.training_seconds()
        return self.stopped_by_budget

    def training_seconds(self):
        """Of the time budget, what training may use: the rest is kept for validation, test and saving."""
        n_eval = len(self.corpus.valid) + len(self.corpus.test)
        if self.eval_seconds is not None:
            final = self.eval_seconds * n_eval / len(self.corpus.valid)
        elif self.session_tokens:  # no validation yet: forward-only runs about three times faster than training
            rate = self.session_tokens / max(time.perf_counter() - self.start, 1e-3)
            final = n_eval / (3 * rate)
        else:
            final = 0.0
        return 60 * self.t.time_budget - 1.2 * final - 5.0

    def progress(self):
        """Fraction of the run done, for the cosine schedule: by steps, or by time under a budget."""
        t = self.t
        windows = (len(self.train_data) - 2) // t.bptt + 1
        total = t.max_steps or t.epochs * windows
        by_steps = self.p.step / total
        if t.time_budget is None:
            return by_steps
        return max(by_steps, self.elapsed() / max(self.training_seconds(), 1e-9))

    def window_length(self):
        """bptt, or with variable_bptt a length drawn as AWD-LSTM does."""
        t = self.t
        if not t.variable_bptt:
            return t.bptt
        rng = self.rngs["bptt"]
        base = t.bptt if rng.random() < 0.95 else t.bptt / 2
        return int(min(max(5, int(rng.normal(base, 5))), t.bptt + 20))

    def train_epoch(self, signals):
        """Train from the current position to the end of the epoch (or max_steps, or a signal).

        Returns False when a divergence recovery moved the run back to a checkpoint.
        """
        t, p = self.t, self.p
        n_rows = len(self.train_data)
        if p.pos == 0:
            self.state = self.model.init_state(t.batch_size)
        interval_start = time.perf_counter()
        bar = tqdm(total=n_rows - 1, initial=p.pos, desc=f"epoch {p.epoch}/{t.epochs}", unit="tok/stream",
                   disable=True if self.quiet else None, leave=False, dynamic_ncols=True)
        while p.pos < n_rows - 1 and not self.out_of_steps():
            T = min(self.window_length(), n_rows - 1 - p.pos)
            x, y = self.train_data[p.pos:p.pos + T], self.train_data[p.pos + 1:p.pos + 1 + T]
            lr = self.schedule.at(p.step, self.progress())
            if t.variable_bptt:  # a longer window sums more steps: keep the per-token rate
                lr *= T / t.bptt
            loss, norm, ok = self.train_step(x, y, lr)
            self.session_tokens += y.size
            p.pos += T
            p.step += 1
            bar.update(T)
            if not ok:
                self.bad_step(loss, norm, lr)
                if self.p is not p:  # recovered: the caller continues from the checkpoint's position
                    bar.close()
                    return False
            else:
                p.bad_in_row = 0
                p.interval_loss += loss * y.size
                p.interval_tokens += y.size
                p.epoch_loss += loss * y.size
                p.epoch_tokens += y.size
            if p.step % t.log_every == 0 and p.interval_tokens:
                now = time.perf_counter()
                mean = p.interval_loss / p.interval_tokens
                tps = p.interval_tokens / max(now - interval_start, 1e-9)
                self.log("train", split="train", loss=mean, ppl=perplexity(mean), lr=lr, tokens_per_s=tps,
                         grad_norm=norm)
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{perplexity(mean):.1f}", lr=f"{lr:.3g}",
                                tok_s=f"{tps:,.0f}", refresh=False)
                p.interval_loss, p.interval_tokens = 0.0, 0
                interval_start = now
            if signals.signum is not None:
                break
            if self.periodic_save_due():
                self.save_periodic()
        bar.close()
        return True

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
            v_loss, valid_ppl, v_count = evaluate(self.model, self.corpus.valid, t.eval_batch_size, t.bptt)
        now = time.perf_counter()
        self.eval_seconds = now - eval_start
        train_ppl = perplexity(p.epoch_loss / p.epoch_tokens) if p.epoch_tokens else None
        lr = self.schedule.at(p.step, self.progress())
        self.log("valid", split="valid", loss=v_loss, ppl=valid_ppl, lr=lr,
                 tokens_per_s=v_count / max(now - eval_start, 1e-9), tokens=v_count, train_ppl=train_ppl)
        if self.optimizer.observe_validation(v_loss):
            self.log("switch_to_averaging", lr=lr)
            self.say(f"validation stopped improving: averaging the weights from step {p.step} on (NT-ASGD)")
        improved = valid_ppl < p.best_valid_ppl
        p.best_valid_ppl = min(p.best_valid_ppl, valid_ppl)
        self.valid_ppl = valid_ppl
        self.say(f"epoch {p.epoch}: train ppl {train_ppl or math.nan:.2f} | valid ppl {valid_ppl:.2f}"
                 f"{' (best)' if improved else ''} | lr {lr:.4g} | {self.elapsed():.0f}s")
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
        best = load_checkpoint(os.path.join(self.ckpt_dir, "best.npz"))
        self.model.load_params(best.params)
        eval_start = time.perf_counter()
        test_loss, test_ppl, test_count = evaluate(self.model, self.corpus.test, t.eval_batch_size, t.bptt)
        now = time.perf_counter()
        self.metrics.write(event="test", epoch=best.meta["epoch"], step=best.meta["step"], split="test",
                           loss=test_loss, ppl=test_ppl, tokens_per_s=test_count / max(now - eval_start, 1e-9),
                           elapsed_s=self.elapsed(), tokens=test_count)
        self.say(f"test ppl {test_ppl:.2f} ({test_count:,} tokens) with the best checkpoint (step "
                 f"{best.meta['step']}, valid ppl {best.meta['metrics']['best_valid_ppl']:.2f}); "
                 f"{self.elapsed():.0f}s in all")
        return {"valid_ppl": self.p.best_valid_ppl, "test_ppl": test_ppl, "test_loss": test_loss,
                "steps": self.p.step, "bad_steps": self.p.bad_total, "elapsed_s": self.elapsed()}


def fit(cfg, run_dir, overwrite=False, resume=None, quiet=False, echo=print, resume_hint=""):
    """Train as ``cfg`` says, writing everything into ``run_dir``; returns the final metrics.

    ``resume``: None to start afresh, "last" for the run's last.npz, or a checkpoint path.
    """
    say = (lambda *a, **k: None) if quiet else echo
    ckpt = None
    if resume is not None:
        path = os.path.join(run_dir, "checkpoints", "last.npz") if resume == "last" else resume
        if not os.path.exists(path):
            raise LmtrainError(f"nothing to resume: {path} does not exist (start the run without --resume)")
        ckpt = load_checkpoint(path)
        unsafe, safe = config_changes(ckpt.meta["config"], cfg.to_dict())
        if unsafe:
            raise LmtrainError(f"cannot resume {path} with a different model or data: "
                               f"{'; '.join(unsafe)} (only {', '.join(sorted(SAFE_TO_CHANGE_ON_RESUME))} "
                               f"may change)")
    corpus = load_corpus(cfg.data, log=say)
    check_sizes(cfg, corpus)
    ckpt_dir = prepare_run_dir(run_dir, overwrite, resume is not None)
    if ckpt is not None and Vocab.from_dict(ckpt.meta["vocab"]) != corpus.vocab:
        raise LmtrainError(f"cannot resume {ckpt.path}: the corpus now gives a different vocabulary "
                           f"(were the data files changed?)")
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dump_yaml(cfg))
    with open(os.path.join(run_dir, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(corpus.vocab.to_dict(), fh)

    trainer = Trainer(cfg, run_dir, corpus, quiet=quiet, echo=echo, resume_hint=resume_hint)
    say(corpus.describe())
    say(f"model: {trainer.model.num_params():,} parameters; run directory {run_dir}")
    if ckpt is None:
        trainer.save("last.npz")  # a run is resumable from its first step
    else:
        trainer.restore(ckpt)
        trainer.elapsed_before = trainer.metrics.truncate_after(trainer.p.step)
        trainer.log("resume", lr=trainer.schedule.lr, checkpoint=ckpt.path, changed=safe)
        say(f"resuming from {ckpt.path} at epoch {trainer.p.epoch}, step {trainer.p.step}"
            + (f" with {'; '.join(safe)}" if safe else ""))
    return trainer.run()
