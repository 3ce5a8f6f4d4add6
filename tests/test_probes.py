"""The recall and gradient-flow probes, and the plots, on small models."""

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest

from lmtrain.config import load_config
from lmtrain.data.synthetic import SPLIT_STREAMS
from lmtrain.nn.layers import Loss
from lmtrain.nn.model import LanguageModel
from lmtrain.probes import PROBE_STREAM, decay_rate, gradflow, held_out_stories
from lmtrain.training import fit


def lmtrain(*args):
    return subprocess.run([sys.executable, "-m", "lmtrain", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def small_run(tiny_config, tmp_path):
    fit(load_config(tiny_config, ["train.epochs=1"]), str(tmp_path / "run"), quiet=True)
    return tmp_path / "run" / "checkpoints" / "best.npz"


def test_stream_mode_scores_the_answer_positions():
    """A stand-in model that predicts the true next token scores every story but the first; an off-by-one one, 0."""
    from lmtrain.config import SyntheticConfig
    from lmtrain.data.vocab import Vocab
    from lmtrain.probes import stream_answers

    stories = held_out_stories(SyntheticConfig(), 4, 30, set())
    vocab = Vocab(["<eos>", "<unk>"] + sorted({w for t, _ in stories for w in t}))
    stream = [vocab.eos_id]
    for t, _ in stories:
        stream += list(vocab.encode(t)) + [vocab.eos_id]

    class StandIn:
        """Reads the stream; its logits point at the true next token (shifted by ``offset``)."""

        def __init__(self, offset):
            self.offset = offset

        def init_state(self, batch):
            return [0]

        def forward(self, ids, state, train=False):
            logits = np.zeros((len(ids), len(vocab)))
            for i in range(len(ids)):
                pos = state[0] + i + 1
                logits[i, ((stream[pos] if pos < len(stream) else 0) + self.offset) % len(vocab)] = 1.0
            return logits, [state[0] + len(ids)]

        def scores(self, out):  # as LanguageModel's under the full softmax: the logits themselves
            return out

        def loss(self, out, targets, weights=None, grad=True):  # the evaluation loop sums it; not read here
            return Loss(0.0, 0.0, float(targets.size))

        def weights_held(self):
            return contextlib.nullcontext()

    expected = [t[a] for t, a in stories[1:]]
    assert stream_answers(StandIn(0), vocab, stories) == expected
    assert all(got != e for got, e in zip(stream_answers(StandIn(1), vocab, stories), expected))


def test_name_errors_count_by_expected_name_and_confusion():
    from lmtrain.probes import name_errors

    answers = [("sara", "lily", "tom"), ("sara", "sara", "tom"), ("lily", "sara", "bob"), ("tom", "sara", "sara")]
    answers += [("bob", "bob", "tom")] * 3
    r = name_errors(answers)
    assert (r["stories"], r["wrong"], r["speaker_answers"]) == (7, 3, 1)
    assert list(r["names"]) == ["lily", "tom", "sara", "bob"]  # worst first: 1/1, 1/1, 1/2, 0/3
    assert r["names"]["sara"] == {"stories": 2, "wrong": 1, "answered": 3}
    assert sorted(r["confusions"]) == [("lily", "sara", 1), ("sara", "lily", 1), ("tom", "sara", 1)]
    from lmtrain.cli import _name_error_lines

    lines = _name_error_lines("lstm", r)
    assert lines[0] == "lstm: 3 of 7 answers wrong (1 of them name the speaker)"
    assert lines[-2:] == [
        "  no errors: bob",
        "  most frequent (expected -> answered): sara -> lily x1, lily -> sara x1, tom -> sara x1",
    ]
    assert _name_error_lines("gru", name_errors(answers[-3:])) == ["gru: 0 of 3 answers wrong"]


def test_probe_stories_are_held_out():
    assert PROBE_STREAM not in {v for k, v in SPLIT_STREAMS.items() if k != "probe"}
    cfg = load_config.__globals__["from_dict"]({}).data.synthetic
    exclude = {" ".join(held_out_stories(cfg, 0, 1, set())[0][0])}
    stories = held_out_stories(cfg, 0, 50, exclude)
    assert all(" ".join(t) not in exclude for t, _ in stories)
    assert all(t[a - 3 : a] == ["said", "hi", "to"] for t, a in stories)


@pytest.mark.parametrize("mode", ["stream", "prompt"])
def test_recall_probe_command_and_json(small_run, tmp_path, mode):
    proc = lmtrain(
        "probe",
        "recall",
        "--ckpt",
        small_run,
        "--distances",
        "0,3",
        "--stories",
        "20",
        "--json",
        "--plot",
        tmp_path / "r.png",
        "--mode",
        mode,
        "--errors",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["distances"] == [0, 3] and out["stories"] == 20 and out["mode"] == mode
    accuracy = next(iter(out["models"].values()))["accuracy"]
    errors = next(iter(out["models"].values()))["errors"]
    assert errors["stories"] == 40 and errors["wrong"] == round(sum(20 * (1 - a) for a in accuracy))
    assert sum(r["wrong"] for r in errors["names"].values()) == errors["wrong"]
    from lmtrain.build import model_from_checkpoint
    from lmtrain.checkpoint import load_checkpoint
    from lmtrain.probes import recall

    model, vocab, cfg = model_from_checkpoint(load_checkpoint(small_run), kernels="auto")
    assert accuracy == [r["accuracy"] for r in recall(model, vocab, cfg, [0, 3], 20, mode)]
    assert out["chance"] == pytest.approx(1 / 15)
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_recall_probe_refuses_a_ptb_model(tmp_path):
    from tests.bad_inputs import run_main

    (tmp_path / "t.yaml").write_text(
        "data: {source: text, train: t.txt, valid: t.txt, test: t.txt}\ntrain: {batch_size: 1, bptt: 2, epochs: 1}\n"
    )
    (tmp_path / "t.txt").write_text("a b c d\ne f g\n")
    assert run_main(["fit", str(tmp_path / "t.yaml"), "--run-dir", str(tmp_path / "run"), "--quiet"])[0] == 0
    code, _, err = run_main(["probe", "recall", "--ckpt", str(tmp_path / "run/checkpoints/best.npz")])
    assert code == 2 and "needs a model trained on the built-in stories" in err


def test_gradflow_at_the_window_start_matches_finite_differences():
    """k = steps is the window's initial state: its gradient norm equals a finite-difference estimate."""
    from lmtrain.config import from_dict
    from lmtrain.data.batching import eval_streams, get_batch
    from tests.gradcheck import numerical_grad

    cfg = from_dict({"model": {"emb_size": 6, "hidden_size": 8}}).model
    model = LanguageModel(cfg, 20, seed=1, dtype="float64")
    ids = np.random.default_rng(0).integers(0, 20, size=400).astype(np.int32)
    norms = gradflow(model, ids, steps=9, batches=1, batch_size=4)
    assert set(norms) == {"h", "c"} and len(norms["h"]) == 10
    x, y = get_batch(eval_streams(ids, 4)[0], 0, 9)
    w = np.zeros((9, 4))
    w[-1] = 1.0
    h0, c0 = model.init_state(4)[0]

    def loss():
        logits, _ = model.forward(x, [(h0, c0)])
        return model.loss(logits, y, w).mean

    for name, s0 in (("h", h0), ("c", c0)):
        fd = numerical_grad(loss, s0, eps=1e-4)  # the gradient is ~1e-6: a larger step keeps rounding small
        assert norms[name][-1] == pytest.approx(np.linalg.norm(fd, axis=1).mean(), rel=1e-5)


def test_decay_rate_recovers_a_known_slope():
    k = np.arange(50)
    assert decay_rate(3.0 * np.exp(-0.2 * k)) == pytest.approx(-0.2)
    assert decay_rate(np.exp(0.05 * k)) == pytest.approx(0.05)


def test_gradflow_command_at_init(tiny_config, tmp_path):
    proc = lmtrain(
        "probe",
        "gradflow",
        "--config",
        tiny_config,
        "--init-only",
        "--steps",
        "8",
        "--batches",
        "2",
        "--plot",
        tmp_path / "g.png",
    )
    assert proc.returncode == 0, proc.stderr
    assert "per-step log-decay" in proc.stdout and (tmp_path / "g.png").exists()
    bad = lmtrain("probe", "gradflow", "--ckpt", "x.npz", "--init-only")
    assert bad.returncode == 2 and "--init-only probes fresh models" in bad.stderr


def test_plot_overlays_runs_and_works_without_matplotlib(small_run, tmp_path, monkeypatch):
    run = small_run.parent.parent
    proc = lmtrain("plot", run, run, "--out", tmp_path / "c.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000
    from tests.bad_inputs import run_main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, out, err = run_main(["plot", str(run), "--out", str(tmp_path / "none.png")])
    assert code == 2 and "valid points" in out  # the figures, and an error: the plot asked for is not there
    assert err.startswith("error: no plot written") and "pip install" in err
    assert not (tmp_path / "none.png").exists()
