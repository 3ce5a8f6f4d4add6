"""Data-parallel training under MPI: two ranks train as one process would, stop together and resume exactly.

Runs where mpi4py and an mpiexec are installed (`pip install -e '.[mpi]'`,
which CI does) and skips elsewhere.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lmtrain.checkpoint import load_checkpoint
from tests.conftest import needs, optional
from tests.test_reliability import RESUMABLE, train_losses

optional("mpi4py", "pip install -e '.[mpi]'")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
needs("mpi4py", MPIEXEC is not None, "no mpiexec found: pip install -e '.[mpi]' brings MPICH's")

# dropout 0 and float64: two ranks must log what one process logs, to rounding
EXACT = """\
data:
  source: synthetic
  lowercase: true
  synthetic: {train_stories: 400, valid_stories: 30, test_stories: 30, max_distance: 6}
model: {emb_size: 16, hidden_size: 24, num_layers: 2, last_hidden_size: 16, tie_weights: true, init: pytorch,
        forget_bias: 1.0}
train: {batch_size: 8, bptt: 10, epochs: 2, optimizer: adam, lr: 0.01, clip_grad_norm: 0.5, eval_batch_size: 5,
        log_every: 1, dtype: float64, state_reset_prob: 0.1, check_sync_every: 10}
seed: 4
"""


def launch(config, run, *extra, ranks=2, env=None, wait=True):
    cmd = [
        MPIEXEC,
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "lmtrain",
        "fit",
        str(config),
        "--run-dir",
        str(run),
        "--quiet",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {}))
    )
    if wait:
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err
    return proc


def single(config, run, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "lmtrain", "fit", str(config), "--run-dir", str(run), "--quiet", *extra],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def events(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def assert_same_curve(a, b, rtol):
    la = [(e["event"], e["step"]) for e in a if e["loss"] is not None]
    lb = [(e["event"], e["step"]) for e in b if e["loss"] is not None]
    assert la == lb
    np.testing.assert_allclose(
        [e["loss"] for e in b if e["loss"] is not None], [e["loss"] for e in a if e["loss"] is not None], rtol=rtol
    )


@pytest.fixture
def exact(tmp_path):
    path = tmp_path / "exact.yaml"
    path.write_text(EXACT)
    return path


@pytest.mark.parametrize("network", [False, True], ids=["shared-memory", "network-path"])
def test_two_ranks_log_what_one_process_logs(exact, tmp_path, network):
    one = single(exact, tmp_path / "one")
    code, _, err = launch(exact, tmp_path / "two", env={"MPIR_CVAR_NOLOCAL": "1"} if network else None)
    assert code == 0, err
    two = events(tmp_path / "two")
    assert_same_curve(one, two, rtol=1e-8)
    for split in ("valid", "test"):
        a = [e["ppl"] for e in one if e["event"] == split]
        b = [e["ppl"] for e in two if e["event"] == split]
        assert len(a) == len(b) > 0 and [f"{x:.6g}" for x in a] == [f"{x:.6g}" for x in b]
    world = [e for e in two if e["event"] == "world"][0]
    assert world["size"] == 2 and len(world["ranks"]) == 2


@pytest.fixture
def resumable(tmp_path):
    path = tmp_path / "resumable.yaml"
    path.write_text(RESUMABLE)  # dropout, state resets, Adam, a step schedule: every generator matters
    return path


@pytest.fixture
def reference(resumable, tmp_path):
    code, _, err = launch(resumable, tmp_path / "reference")
    assert code == 0, err
    return train_losses(tmp_path / "reference")


def wait_for_train_lines(run, n, proc, timeout=120):
    """Block until the job has logged n train events; fails saying so if it ends first or the time runs out."""
    deadline = time.time() + timeout
    while not (
        os.path.exists(run / "metrics.jsonl") and sum('"train"' in line for line in open(run / "metrics.jsonl")) >= n
    ):
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before logging {n} train events")
        if time.time() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {n} train events in {run}")
        time.sleep(0.01)


def test_ctrl_c_to_mpiexec_saves_once_and_resumes_exactly(resumable, reference, tmp_path):
    run = tmp_path / "interrupted"
    proc = launch(resumable, run, "--set", "train.keep_last=2", wait=False)  # numbered saves: collectives too
    wait_for_train_lines(run, 40, proc)
    proc.send_signal(signal.SIGINT)  # mpiexec passes it to every rank
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("stopped by SIGINT") == 1 and "mpiexec -n 2 lmtrain fit" in err and "--resume" in err
    step = load_checkpoint(run / "checkpoints" / "last.npz").meta["step"]
    assert 40 <= step < reference[-1][0]
    code, _, err = launch(resumable, run, "--resume", "--set", "train.keep_last=2")
    assert code == 0, err
    assert train_losses(run) == reference
    assert len(list((run / "checkpoints").glob("step-*.npz"))) == 2


def test_a_killed_rank_ends_the_job_with_its_name_and_the_run_resumes_exactly(resumable, reference, tmp_path):
    run = tmp_path / "killed"
    proc = launch(resumable, run, wait=False)
    wait_for_train_lines(run, 60, proc)
    world = [e for e in events(run) if e["event"] == "world"][0]
    os.kill(world["ranks"][1][1], signal.SIGKILL)  # rank 1's training process
    start = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - start < 60 and proc.returncode != 0
    assert f"rank 1 of 2 (pid {world['ranks'][1][1]}" in err and "SIGKILL" in err
    load_checkpoint(run / "checkpoints" / "last.npz")  # intact
    code, _, err = launch(resumable, run, "--resume")
    assert code == 0, err
    assert train_losses(run) == reference


def test_resume_on_another_number_of_ranks_reshards_the_streams(exact, tmp_path):
    one = single(exact, tmp_path / "one")
    run = tmp_path / "moved"
    code, _, err = launch(exact, run, "--set", "train.max_steps=60")
    assert code == 0, err
    after = single(exact, run, "--resume")
    resume = [e for e in after if e["event"] == "resume"][0]
    assert resume["from_world_size"] == 2 and resume["world_size"] == 1
    trained = lambda evs: [e for e in evs if e["event"] == "train"]  # noqa: E731
    assert_same_curve(trained(one), trained(after), rtol=1e-8)


def test_a_batch_that_does_not_divide_is_one_error(exact, tmp_path):
    code, _, err = launch(exact, tmp_path / "r", "--set", "train.batch_size=7")
    assert code == 2
    assert err.strip() == (
        "error: train.batch_size 7 must divide by the 2 ranks times train.accumulate 1: each "
        "rank reads an equal share of the streams"
    )
    assert not (tmp_path / "r").exists()


# Rank 1 alone gets a NaN gradient on the given calls of backward (rank 0's stay finite): the ranks must
# still skip the same steps and reload together.
NAN_ON_RANK_1 = """
import sys
import numpy as np
from lmtrain.nn.model import LanguageModel
from lmtrain.cli import main
calls, bad = [0], {int(c) for c in sys.argv[1].split(",")}
backward = LanguageModel.backward
def poisoned(self, *args, **kwargs):
    out = backward(self, *args, **kwargs)
    calls[0] += 1
    from lmtrain.world import get_world
    if get_world().rank == 1 and calls[0] in bad:
        self.grads["decoder.bias"][0] = np.nan
    return out
LanguageModel.backward = poisoned
main(sys.argv[2:])
"""


def test_a_nan_on_one_rank_is_skipped_and_recovered_from_by_all(resumable, tmp_path):
    run = tmp_path / "nan"
    calls = ",".join(map(str, [30, *range(40, 45)]))  # one skipped step, then five in a row: a reload
    proc = subprocess.run(
        [
            MPIEXEC,
            "-n",
            "2",
            sys.executable,
            "-c",
            NAN_ON_RANK_1,
            calls,
            "fit",
            str(resumable),
            "--run-dir",
            str(run),
            "--quiet",
            "--set",
            "train.epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ev = events(run)
    assert [e["step"] for e in ev if e["event"] == "bad_step"] == [30, 40, 41, 42, 43, 44]
    recover = [e for e in ev if e["event"] == "recover"]
    assert len(recover) == 1 and recover[0]["from_step"] == 36
    assert ev[-1]["event"] == "test" and np.isfinite(ev[-1]["ppl"])
