"""Runs survive interrupts, kills, divergence and disk failures, and resume exactly."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import load_config
from lmtrain.errors import LmtrainError
from lmtrain.nn.model import LanguageModel
from lmtrain.training import fit

# Everything that carries state across steps is switched on: dropout and state
# resets (random generators), Adam (moments), a step schedule, two layers.
RESUMABLE = """\
data:
  source: synthetic
  synthetic: {train_stories: 500, valid_stories: 20, test_stories: 20, max_distance: 6}
model: {emb_size: 24, hidden_size: 96, num_layers: 2, dropout: 0.3}
train: {batch_size: 8, bptt: 12, epochs: 3, optimizer: adam, lr: 0.003, clip_grad_norm: 1.0,
        lr_schedule: step, lr_decay: 0.5, lr_decay_start: 1, state_reset_prob: 0.2, eval_batch_size: 4,
        log_every: 1, checkpoint_every: 9}
seed: 11
"""


def train_losses(run):
    events = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


def start(cfg, run, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "lmtrain", "fit", str(cfg), "--run-dir", str(run), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def count_train_lines(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as fh:
        return sum('"event": "train"' in line for line in fh)


def wait_for_lines(run, n, proc, timeout=120):
    """Block until the process has logged n more train events than now; fails saying so if it ends first or
    the time runs out."""
    target = count_train_lines(run) + n
    deadline = time.time() + timeout
    while count_train_lines(run) < target:
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before logging {n} more train events: "
                f"{proc.stderr.read()[-2000:]}"
            )
        if time.time() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {n} more train events in {run}")
        time.sleep(0.002)


def finish(proc, timeout=300):
    """The exit code of ``proc``, which must end within ``timeout`` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"gave up after {timeout} s waiting for {proc.args[2:5]} to end") from None


def read_line(stream, timeout=60, what="a line"):
    """The next line of ``stream`` (a pipe), or a failure saying what did not come within ``timeout`` s."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Timeout

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream.readline)
        try:
            return future.result(timeout=timeout)
        except Timeout:
            stream.close()  # unblocks the reader
            raise AssertionError(f"gave up after {timeout} s waiting for {what}") from None


@pytest.fixture
def resumable(tmp_path):
    cfg = tmp_path / "resumable.yaml"
    cfg.write_text(RESUMABLE)
    return cfg


@pytest.fixture
def reference(resumable, tmp_path):
    run = tmp_path / "reference"
    proc = start(resumable, run)
    assert finish(proc) == 0, proc.stderr.read()
    return train_losses(run)


def test_interrupted_runs_resume_to_identical_losses(resumable, reference, tmp_path):
    """SIGINT, SIGTERM and SIGKILL at random steps; every logged training loss equals the reference, bit for bit."""
    rng = random.Random(7)
    run = tmp_path / "interrupted"
    total = len(reference)
    plan = [signal.SIGINT, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT]
    done_signals = []
    proc = start(resumable, run)
    for sig in plan:
        wait_for_lines(run, rng.randrange(5, total // len(plan)), proc)
        proc.send_signal(sig)
        code = finish(proc)
        expected = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig]
        assert code == expected, proc.stderr.read()
        if sig != signal.SIGKILL:
            assert "--resume" in proc.stderr.read()
        done_signals.append(sig)
        load_checkpoint(run / "checkpoints" / "last.npz")  # always loadable
        proc = start(resumable, run, "--resume")
    assert finish(proc) == 0, proc.stderr.read()
    assert len(done_signals) == len(plan)
    assert train_losses(run) == reference
    resumes = [json.loads(l) for l in open(run / "metrics.jsonl") if '"resume"' in l]
    assert len(resumes) == len(done_signals)


# Runs `lmtrain fit` with the checkpoint writer stopped once the Nth file is fully written to its temporary
# name and before the rename: the parent learns it from "PAUSED" on stdout and kills the process there.
PAUSE_BEFORE_RENAME = """
import sys, time
import lmtrain.checkpoint as checkpoint
from lmtrain.cli import main
write, calls = checkpoint.write_npz, [0]
def paused(fh, arrays):
    write(fh, arrays)
    calls[0] += 1
    if calls[0] == int(sys.argv[1]):
        fh.flush()
        print("PAUSED", flush=True)
        time.sleep(600)
checkpoint.write_npz = paused
main(sys.argv[2:])
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(resumable, reference, tmp_path):
    """Killed between writing a checkpoint and renaming it: the old file loads and the run resumes exactly."""
    run = tmp_path / "killed"
    ckpt_dir = run / "checkpoints"
    # writes: last.npz at step 0, then last.npz at steps 9, 18, 27: stop inside the fourth
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSE_BEFORE_RENAME, "4", "fit", str(resumable), "--run-dir", str(run), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert read_line(proc.stdout, what="the writer to pause").strip() == "PAUSED", proc.stderr.read()
    assert len(glob.glob(str(ckpt_dir / ".last.npz.tmp-*"))) == 1
    proc.kill()
    finish(proc)
    before = load_checkpoint(ckpt_dir / "last.npz")  # the previous checkpoint is intact
    assert before.meta["step"] == 18
    proc = start(resumable, run, "--resume")
    assert finish(proc) == 0, proc.stderr.read()
    assert not glob.glob(str(ckpt_dir / ".*.tmp-*"))  # leftovers cleaned on resume
    assert train_losses(run) == reference


# A model whose every step takes seconds, so a second Ctrl-C surely arrives inside the step the first
# one asked to finish.
SLOW_STEPS = """\
data:
  source: synthetic
  synthetic: {train_stories: 2000, valid_stories: 20, test_stories: 20}
model: {emb_size: 256, hidden_size: 1024}
train: {batch_size: 32, bptt: 120, epochs: 1, log_every: 1, checkpoint_every: 1000}
"""


def test_second_ctrl_c_quits_at_once_and_keeps_checkpoints(tmp_path):
    """The first Ctrl-C finishes the step and saves; a second one inside that step quits at once, saving nothing."""
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(SLOW_STEPS)
    run = tmp_path / "twice"
    proc = start(cfg, run)
    wait_for_lines(run, 1, proc)
    proc.send_signal(signal.SIGINT)
    lines = read_line(proc.stdout, what="the handler's first line") + read_line(proc.stdout, what="its message")
    assert "SIGINT received" in lines  # the handler ran
    steps_logged = count_train_lines(run)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    quit_after = time.time() - sent
    err = proc.stderr.read()
    # a graceful stop would have finished the step, saved it and printed how to resume
    assert "stopped by SIGINT" not in err and "--resume" not in err
    assert count_train_lines(run) == steps_logged
    first_step = json.loads(open(run / "metrics.jsonl").readline())["elapsed_s"]
    assert quit_after < first_step / 2
    assert load_checkpoint(run / "checkpoints" / "last.npz").meta["step"] == 0  # the one from the start


def test_periodic_checkpoints_change_nothing(resumable, reference, tmp_path):
    run = tmp_path / "often"
    proc = start(resumable, run, "--set", "train.checkpoint_every=1", "--set", "train.keep_last=3")
    assert finish(proc) == 0, proc.stderr.read()
    assert train_losses(run) == reference
    numbered = sorted(p.name for p in (run / "checkpoints").glob("step-*.npz"))
    assert len(numbered) == 3 and numbered[-1] == f"step-{reference[-1][0]:08d}.npz"


def test_same_seed_gives_bit_identical_checkpoint_files(resumable, tmp_path):
    for name in ("a", "b"):
        assert finish(start(resumable, tmp_path / name, "--set", "train.epochs=1")) == 0
    for ckpt in ("best.npz", "last.npz"):
        a = (tmp_path / "a" / "checkpoints" / ckpt).read_bytes()
        assert a == (tmp_path / "b" / "checkpoints" / ckpt).read_bytes()
    assert finish(start(resumable, tmp_path / "c", "--set", "train.epochs=1", "--set", "seed=4")) == 0
    with (
        np.load(tmp_path / "a" / "checkpoints" / "last.npz") as a,
        np.load(tmp_path / "c" / "checkpoints" / "last.npz") as c,
    ):
        assert not np.array_equal(a["param/embedding.weight"], c["param/embedding.weight"])


def quiet(*a, **k):
    pass


def test_resume_refuses_model_or_data_changes_and_records_safe_ones(resumable, tmp_path):
    run = str(tmp_path / "run")
    fit(load_config(resumable, ["train.max_steps=10"]), run, quiet=True)
    with pytest.raises(LmtrainError, match=r"model.hidden_size: 96 -> 64; train.lr: 0.003 -> 0.1"):
        fit(load_config(resumable, ["model.hidden_size=64", "train.lr=0.1"]), run, resume="last", quiet=True)
    with pytest.raises(LmtrainError, match="already holds a run"):
        fit(load_config(resumable), run, quiet=True)
    fit(load_config(resumable, ["train.max_steps=20", "train.log_every=2"]), run, resume="last", quiet=True)
    resume = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"resume"' in l][0]
    assert resume["changed"] == ["train.log_every: 1 -> 2", "train.max_steps: 10 -> 20"]
    assert load_checkpoint(os.path.join(run, "checkpoints", "last.npz")).meta["step"] == 20


def test_resume_without_a_checkpoint(resumable, tmp_path):
    with pytest.raises(LmtrainError, match="nothing to resume"):
        fit(load_config(resumable), str(tmp_path / "fresh"), resume="last", quiet=True)


def inject_nan(monkeypatch, at_calls):
    """Make LanguageModel.backward put NaN into one gradient on the given (1-based) calls."""
    original = LanguageModel.backward
    calls = {"n": 0}

    def backward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in at_calls:
            self.grads["decoder.bias"][0] = np.nan
        return out

    monkeypatch.setattr(LanguageModel, "backward", backward)


def events(run):
    return [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]


def test_a_nan_gradient_is_skipped(resumable, tmp_path, monkeypatch):
    inject_nan(monkeypatch, {30})
    run = str(tmp_path / "run")
    result = fit(load_config(resumable, ["train.epochs=1"]), run, quiet=True)
    bad = [e for e in events(run) if e["event"] == "bad_step"]
    assert [(e["step"], e["grad_norm"], e["bad_in_row"]) for e in bad] == [(30, None, 1)]
    assert result["bad_steps"] == 1 and np.isfinite(result["test_ppl"])
    ckpt = load_checkpoint(os.path.join(run, "checkpoints", "last.npz"))
    assert all(np.isfinite(p).all() for p in ckpt.params.values())


def test_repeated_nans_reload_the_last_checkpoint_at_a_lower_rate(resumable, tmp_path, monkeypatch):
    inject_nan(monkeypatch, set(range(40, 45)))  # max_bad_steps (5) in a row
    run = str(tmp_path / "run")
    result = fit(load_config(resumable, ["train.epochs=1"]), run, quiet=True)
    ev = events(run)
    recover = [e for e in ev if e["event"] == "recover"]
    assert len(recover) == 1
    assert recover[0]["from_step"] == 36  # last periodic checkpoint (every 9 steps)
    assert recover[0]["lr"] == pytest.approx(0.003 * 0.5)
    after = [e for e in ev[ev.index(recover[0]) :] if e["event"] == "train"]
    assert after[0]["step"] == 37 and after[0]["lr"] == pytest.approx(0.0015)
    assert result["bad_steps"] == 5 and np.isfinite(result["test_ppl"])


def test_divergence_without_recovery_stops_with_a_message(resumable, tmp_path, monkeypatch):
    inject_nan(monkeypatch, set(range(10, 100)))
    with pytest.raises(LmtrainError, match="training diverged: 5 non-finite steps in a row"):
        fit(load_config(resumable, ["train.bad_step_lr_factor=null"]), str(tmp_path / "run"), quiet=True)


def test_a_failed_checkpoint_write_stops_cleanly(resumable, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    fit(load_config(resumable, ["train.max_steps=9"]), run, quiet=True)
    last = os.path.join(run, "checkpoints", "last.npz")
    before = open(last, "rb").read()

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", no_space)
    with pytest.raises(LmtrainError, match="cannot write checkpoint .*No space left on device") as err:
        fit(load_config(resumable, ["train.max_steps=30"]), run, resume="last", quiet=True)
    assert err.value.exit_code == 1
    assert open(last, "rb").read() == before
    assert not glob.glob(os.path.join(run, "checkpoints", ".*tmp*"))
