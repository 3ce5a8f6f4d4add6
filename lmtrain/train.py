"""The training loop (truncated BPTT with clipping) and evaluation."""
import json
import math
import os
import shutil
import time

import numpy as np

from tqdm import tqdm

from lmtrain.backend import xp
from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.config import dump_yaml
from lmtrain.data.batching import batchify, eval_streams, num_windows, windows
from lmtrain.data.sources import load_corpus
from lmtrain.errors import LmtrainError
from lmtrain.nn.model import LanguageModel
from lmtrain.optim import LRSchedule, clip_grad_norm, make_optimizer


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


class MetricsLog:
    """metrics.jsonl: one JSON object per event, flushed as it happens."""

    def __init__(self, path):
        self.path = path

    def write(self, **event):
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")


def prepare_run_dir(run_dir, overwrite):
    """Create the run directory; refuse to reuse another run's unless asked to."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    used = [p for p in ("metrics.jsonl", "checkpoints") if os.path.exists(os.path.join(run_dir, p))]
    if used and not overwrite:
        raise LmtrainError(f"run directory {run_dir} already holds a run ({used[0]}); pass --overwrite "
                           f"to replace it or --run-dir to choose another")
    if used:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for name in ("metrics.jsonl",):
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                os.remove(path)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as err:
        raise LmtrainError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    return ckpt_dir


def reset_streams(state, which):
    """Zero the carried (h, c) of the streams (batch columns) selected by a boolean mask."""
    if which.any():
        for layer in state:
            for s in layer:
                s[which] = 0


def check_sizes(cfg, corpus):
    B, T = cfg.train.batch_size, cfg.train.bptt
    per_stream = len(corpus.train) // B
    if per_stream < 2:
        raise LmtrainError(f"train.batch_size {B} is too large: the training split has {len(corpus.train)} "
                           f"tokens, fewer than 2 per stream")
    if T > per_stream - 1:
        raise LmtrainError(f"train.bptt {T} is longer than the {per_stream - 1} steps each of the {B} "
                           f"training streams has; lower train.bptt or train.batch_size")


def fit(cfg, run_dir, overwrite=False, quiet=False, echo=print):
    """Train as ``cfg`` says, writing everything into ``run_dir``; returns the final metrics."""
    t = cfg.train
    say = (lambda *a, **k: None) if quiet else echo
    corpus = load_corpus(cfg.data, log=say)
    check_sizes(cfg, corpus)
    vocab = corpus.vocab
    ckpt_dir = prepare_run_dir(run_dir, overwrite)
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dump_yaml(cfg))
    with open(os.path.join(run_dir, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab.to_dict(), fh)
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))

    model = LanguageModel(cfg.model, len(vocab), seed=cfg.seed, dtype=t.dtype)
    optimizer = make_optimizer(t, model.params)
    schedule = LRSchedule(t)
    say(f"{corpus.describe()}")
    say(f"model: {model.num_params():,} parameters; run directory {run_dir}")

    reset_rng = np.random.default_rng([cfg.seed, 2])
    train_data = batchify(corpus.train, t.batch_size)
    n_windows = num_windows(len(train_data), t.bptt)
    base_meta = {"config": cfg.to_dict(), "vocab": vocab.to_dict()}
    start = time.perf_counter()
    step = 0
    best_ppl = math.inf
    valid_ppl = None
    stop = False
    for epoch in range(1, t.epochs + 1):
        lr = schedule.lr
        state = model.init_state(t.batch_size)
        interval_loss = interval_steps = interval_tokens = 0
        epoch_loss = epoch_tokens = 0.0
        interval_start = time.perf_counter()
        bar = tqdm(total=n_windows, desc=f"epoch {epoch}/{t.epochs}", unit="win", disable=True if quiet else None,
                   leave=False, dynamic_ncols=True)
        for x, y in windows(train_data, t.bptt):
            if t.state_reset_prob:
                reset_streams(state, reset_rng.random(t.batch_size) < t.state_reset_prob)
            logits, state = model.forward(xp.asarray(x), state, train=True)
            loss = model.loss(logits, xp.asarray(y))
            model.backward()
            clip_grad_norm(model.grads, t.clip_grad_norm)
            optimizer.step(model.params, model.grads, lr)
            step += 1
            n_tok = y.size
            interval_loss += loss * n_tok
            interval_tokens += n_tok
            interval_steps += 1
            epoch_loss += loss * n_tok
            epoch_tokens += n_tok
            bar.update(1)
            if step % t.log_every == 0:
                now = time.perf_counter()
                mean = interval_loss / interval_tokens
                tps = interval_tokens / max(now - interval_start, 1e-9)
                metrics.write(event="train", epoch=epoch, step=step, split="train", loss=mean,
                              ppl=perplexity(mean), lr=lr, tokens_per_s=tps, elapsed_s=now - start)
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{perplexity(mean):.1f}", lr=f"{lr:.3g}",
                                tok_s=f"{tps:,.0f}", refresh=False)
                interval_loss = interval_tokens = interval_steps = 0
                interval_start = now
            if t.max_steps is not None and step >= t.max_steps:
                stop = True
                break
        bar.close()

        eval_start = time.perf_counter()
        v_loss, valid_ppl, v_count = evaluate(model, corpus.valid, t.eval_batch_size, t.bptt)
        now = time.perf_counter()
        metrics.write(event="valid", epoch=epoch, step=step, split="valid", loss=v_loss, ppl=valid_ppl, lr=lr,
                      tokens_per_s=v_count / max(now - eval_start, 1e-9), elapsed_s=now - start,
                      tokens=v_count, train_ppl=perplexity(epoch_loss / max(epoch_tokens, 1)))
        improved = valid_ppl < best_ppl
        best_ppl = min(best_ppl, valid_ppl)
        say(f"epoch {epoch}: train ppl {perplexity(epoch_loss / max(epoch_tokens, 1)):.2f} | valid ppl "
            f"{valid_ppl:.2f}{' (best)' if improved else ''} | lr {lr:.4g} | {now - start:.0f}s")
        schedule.epoch_end(epoch, valid_ppl)
        meta = dict(base_meta, epoch=epoch, step=step,
                    metrics={"valid_ppl": valid_ppl, "valid_loss": v_loss, "best_valid_ppl": best_ppl},
                    schedule=schedule.state_dict(), optimizer=optimizer.state_dict()["scalars"])
        optim_arrays = optimizer.state_dict()["arrays"]
        if improved:
            save_checkpoint(os.path.join(ckpt_dir, "best.npz"), model.params, meta, optim_arrays)
        save_checkpoint(os.path.join(ckpt_dir, "last.npz"), model.params, meta, optim_arrays)
        if stop:
            break

    # The reported test perplexity is that of the saved best checkpoint, exactly
    # what `lmtrain eval --ckpt .../best.npz --split test` computes.
    best = load_checkpoint(os.path.join(ckpt_dir, "best.npz"))
    model.load_params(best.params)
    eval_start = time.perf_counter()
    test_loss, test_ppl, test_count = evaluate(model, corpus.test, t.eval_batch_size, t.bptt)
    now = time.perf_counter()
    metrics.write(event="test", epoch=best.meta["epoch"], step=best.meta["step"], split="test", loss=test_loss,
                  ppl=test_ppl, lr=None, tokens_per_s=test_count / max(now - eval_start, 1e-9),
                  elapsed_s=now - start, tokens=test_count)
    say(f"test ppl {test_ppl:.2f} ({test_count:,} tokens) with the best checkpoint (epoch {best.meta['epoch']}, "
        f"valid ppl {best.meta['metrics']['valid_ppl']:.2f}); {now - start:.0f}s in all")
    return {"valid_ppl": best_ppl, "test_ppl": test_ppl, "test_loss": test_loss, "steps": step,
            "elapsed_s": now - start}
