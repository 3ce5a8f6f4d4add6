"""`lmtrain fit`: checking a config against its corpus, preparing the run directory, starting or resuming a
Run (lmtrain/training/run.py)."""

import os
import socket

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import SAFE_TO_CHANGE_ON_RESUME
from lmtrain.data.sources import load_corpus
from lmtrain.data.vocab import Vocab, vocab_difference
from lmtrain.errors import LmtrainError
from lmtrain.nn.adaptive import check_cutoffs
from lmtrain.optim import averaging_start
from lmtrain.run_dir import RunLock, check_run_dir, config_changes, prepare_run_dir
from lmtrain.training.run import Run
from lmtrain.world import World


def check_sizes(cfg, n_train, world):
    t = cfg.train
    B, T, K, N = t.batch_size, t.bptt, world.size, t.accumulate
    if B % (K * N):
        raise LmtrainError(
            f"train.batch_size {B} must divide by the {K} rank{'s' if K > 1 else ''} times "
            f"train.accumulate {N}: each rank reads an equal share of the streams"
        )
    per_stream = n_train // B
    if per_stream < 2:
        raise LmtrainError(
            f"train.batch_size {B} is too large: the training split has {n_train} tokens, fewer than 2 per stream"
        )
    if T > per_stream - 1:
        raise LmtrainError(
            f"train.bptt {T} is longer than the {per_stream - 1} steps each of the {B} "
            f"training streams has; lower train.bptt or train.batch_size"
        )


def read_resume_checkpoint(path, cfg):
    """The checkpoint to resume from, refused when the config changes what it trained."""
    if not os.path.exists(path):
        raise LmtrainError(f"nothing to resume: {path} does not exist (start the run without --resume)")
    ckpt = load_checkpoint(path)
    unsafe, safe = config_changes(ckpt.meta["config"], cfg.to_dict())
    if unsafe:
        raise LmtrainError(
            f"cannot resume {path} with a different model or data: "
            f"{'; '.join(unsafe)} (only {', '.join(sorted(SAFE_TO_CHANGE_ON_RESUME))} "
            f"may change)"
        )
    ckpt.changed = safe
    return ckpt


def check_vocab(ckpt, vocab):
    difference = vocab_difference(Vocab.from_dict(ckpt.meta["vocab"]), vocab)
    if difference:
        raise LmtrainError(
            f"cannot resume {ckpt.path}: the corpus now gives another vocabulary ({difference}); "
            f"were the data files changed?"
        )


def fit(cfg, run_dir, overwrite=False, resume=None, quiet=False, echo=print, resume_hint="", world=World()):
    """Train as ``cfg`` says, writing everything into ``run_dir``; returns the final metrics.

    ``resume``: None to start afresh, "last" for the run's last.npz, or a checkpoint path.  ``world``: the
    ranks training together (see lmtrain.world); rank 0 holds the run directory's lock for the whole run,
    reads the checkpoint and writes the directory.  Each set-up step either succeeds on every rank or fails
    on all of them, and nothing is written into the directory before all of them succeeded.
    """
    say = (lambda *a, **k: None) if quiet or not world.is_main else echo
    lock = world.on_every_rank(lambda: RunLock(run_dir) if world.is_main else None)
    try:
        world.on_main(lambda: check_run_dir(run_dir, overwrite, resume is not None))
        run, ckpt = set_up(cfg, run_dir, resume, quiet, echo, resume_hint, world, say)
        world.on_main(lambda: prepare_run_dir(run_dir, overwrite, resume is not None, cfg, run.corpus.vocab))
    except BaseException:
        if world.is_main:
            lock.abandon()
        raise
    say(run.corpus.describe())
    say(
        f"model: {run.model.num_params():,} parameters; run directory {run_dir}; "
        f"element-wise kernels: {run.model.layers.name}"
    )
    if averaging_start(cfg.train) != cfg.train.average_from:  # set, but no epoch after it to average
        say(
            f"note: train.average_from {cfg.train.average_from} is not below train.epochs {cfg.train.epochs}: "
            f"this run evaluates its last weights, not an average"
        )
    if ckpt is None:
        run.save("last.npz")  # a run is resumable from its first step
    else:
        resume_run(run, ckpt, world, say)
    if world.size > 1:  # which process is which rank: the launcher's messages name process ids
        ranks = world.gather([socket.gethostname(), os.getpid()])
        run.log.event("world", size=world.size, ranks=ranks, streams_per_rank=cfg.train.batch_size // world.size)
        say(
            f"{world.describe()}, {cfg.train.batch_size // world.size} streams each: "
            + ", ".join(f"rank {r} pid {pid} on {host}" for r, (host, pid) in enumerate(ranks or []))
        )
    return run.run()


def set_up(cfg, run_dir, resume, quiet, echo, resume_hint, world, say):
    """(the Run, the checkpoint to resume from or None): the checkpoint read and checked against the config,
    the corpus loaded (rank 0 first: it downloads and caches; the others then find the files) and checked
    against the config and the checkpoint, the model built.  Nothing is written into the run directory."""
    ckpt = None
    if resume is not None:
        path = os.path.join(run_dir, "checkpoints", "last.npz") if resume == "last" else resume
        ckpt = world.on_main(lambda: read_resume_checkpoint(path, cfg))
    corpus = world.main_first(lambda: load_corpus(cfg.data, log=say))
    world.on_every_rank(lambda: check_sizes(cfg, len(corpus.train), world))
    if cfg.model.softmax == "adaptive":
        world.on_every_rank(lambda: check_cutoffs(cfg.model.adaptive_cutoffs, len(corpus.vocab)))
    if ckpt is not None:
        world.on_every_rank(lambda: check_vocab(ckpt, corpus.vocab))

    def build():
        try:
            return Run(cfg, run_dir, corpus, world=world, quiet=quiet, echo=echo, resume_hint=resume_hint)
        except MemoryError:
            raise LmtrainError(
                "not enough memory for this model and its optimizer state; make the model or its "
                "vocabulary smaller (model.hidden_size, data.max_size)",
                exit_code=1,
            ) from None

    return world.on_every_rank(build), ckpt


def resume_run(run, ckpt, world, say):
    """Continue ``run`` from ``ckpt``: its parts restored, the metrics log cut back to the checkpoint's step
    (the events after it will come again) and the clock continued from there."""
    run.restore(ckpt)
    elapsed, torn = world.broadcast(run.metrics.truncate_after(run.p.step) if world.is_main else None)
    run.budget.resumed(elapsed)
    if torn:
        say(
            f"note: the last line of {run.metrics.path} was cut off ({torn} bytes, a write interrupted by a crash "
            f"or a full disk); it was dropped, and the events after the checkpoint are logged again"
        )
    before = ckpt.meta.get("world_size", 1)
    moved = before != world.size
    run.log.event(
        "resume",
        lr=run.schedule.lr,
        checkpoint=ckpt.path,
        changed=ckpt.changed,
        world_size=world.size,
        **({"from_world_size": before} if moved else {}),
    )
    say(
        f"resuming from {ckpt.path} at epoch {run.p.epoch}, step {run.p.step}"
        + (f" with {'; '.join(ckpt.changed)}" if ckpt.changed else "")
        + (f"; its {before} ranks' streams re-sharded over {world.size}" if moved else "")
    )
