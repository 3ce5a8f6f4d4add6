"""The command line as a user runs it: real processes, real exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmtrain.evaluation import perplexity


def lmtrain(*args, check=None, env=None):
    """Run the CLI in a subprocess; ``env``: variables set for it on top of this process's environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmtrain", *map(str, args)],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def assert_one_line_error(proc, fragment, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture
def trained(tiny_config, tmp_path):
    proc = lmtrain("fit", tiny_config, "--run-dir", tmp_path / "run", check=0)
    return tmp_path / "run", proc


def test_fit_writes_a_complete_run_directory(trained):
    run, _ = trained
    assert (run / "config.yaml").is_file() and (run / "vocab.json").is_file()
    assert (run / "checkpoints" / "best.npz").is_file() and (run / "checkpoints" / "last.npz").is_file()
    events = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for e in events:
        assert {"event", "epoch", "step", "split", "loss", "ppl", "lr", "tokens_per_s", "elapsed_s"} <= set(e)
    kinds = [e["event"] for e in events]
    assert kinds.count("valid") == 2 and kinds[-1] == "test" and "train" in kinds
    for e in events:
        assert e["ppl"] == pytest.approx(perplexity(e["loss"]))


def test_eval_reproduces_the_logged_test_perplexity(trained):
    run, _ = trained
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][-1]
    out = json.loads(
        lmtrain("eval", "--ckpt", run / "checkpoints" / "best.npz", "--split", "test", "--json", check=0).stdout
    )
    assert f"{out['ppl']:.4g}" == f"{logged['ppl']:.4g}"
    assert out["ppl"] == pytest.approx(logged["ppl"], rel=1e-9)
    assert out["tokens"] == logged["tokens"]
    text = lmtrain("eval", "--ckpt", run / "checkpoints" / "best.npz", "--split", "valid", check=0).stdout
    assert "valid perplexity" in text


def test_eval_on_a_text_file(trained, tmp_path):
    run, _ = trained
    (tmp_path / "mine.txt").write_text("Tom said hi to Mary .\n")
    out = json.loads(
        lmtrain(
            "eval", "--ckpt", run / "checkpoints" / "best.npz", "--text", tmp_path / "mine.txt", "--json", check=0
        ).stdout
    )
    assert out["tokens"] == 7  # every token of the file, the first after an <eos>
    # the same seven targets scored one token at a time, each of eval's three streams from a zero state
    from lmtrain.build import model_from_checkpoint
    from lmtrain.checkpoint import load_checkpoint
    from lmtrain.evaluation import feed

    model, vocab, _ = model_from_checkpoint(load_checkpoint(run / "checkpoints" / "best.npz"))
    ids = vocab.encode("<eos> tom said hi to mary . <eos>".split())
    nll = []
    for stream in (ids[0:4], ids[3:7], ids[6:8]):
        state = model.init_state(1)
        for prev, target in zip(stream[:-1], stream[1:]):
            scores, state = feed(model, [prev], state)
            nll.append(np.log(np.exp(scores - scores.max()).sum()) + scores.max() - scores[target])
    assert out["ppl"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)


def test_generate_shows_top_words_and_uses_latest_run(trained):
    run, _ = trained
    proc = lmtrain(
        "generate",
        "--ckpt",
        run / "checkpoints" / "best.npz",
        "--prompt",
        "Mary said hi to",
        "--show-top",
        "3",
        "--greedy",
        "--max-tokens",
        "2",
        check=0,
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "most likely next words:" and len(lines) == 5
    assert lines[-1].startswith("mary said hi to ")
    # without --ckpt: the best checkpoint of the latest run under runs/
    lmtrain("fit", run.parent / "tiny.yaml", "--quiet", "--set", "train.epochs=1", check=0)
    proc = lmtrain("generate", "--prompt", "the", "--max-tokens", "5", "--seed", "1", check=0)
    assert "runs/tiny/checkpoints/best.npz" in proc.stderr
    again = lmtrain("generate", "--prompt", "the", "--max-tokens", "5", "--seed", "1", check=0)
    assert again.stdout == proc.stdout  # seeded sampling repeats


def test_unknown_prompt_words_are_reported(trained):
    run, _ = trained
    proc = lmtrain(
        "generate", "--ckpt", run / "checkpoints" / "best.npz", "--prompt", "zyzzyva said", "--max-tokens", "1", check=0
    )
    assert "not in the vocabulary, read as <unk>: zyzzyva" in proc.stderr


def test_existing_run_is_not_overwritten(trained, tiny_config):
    run, _ = trained
    before = (run / "checkpoints" / "best.npz").read_bytes()
    assert_one_line_error(lmtrain("fit", tiny_config, "--run-dir", run), "already holds a run")
    assert (run / "checkpoints" / "best.npz").read_bytes() == before
    lmtrain("fit", tiny_config, "--run-dir", run, "--overwrite", "--quiet", check=0)


def test_python_dash_m_and_version():
    assert lmtrain("--version", check=0).stdout.startswith("lmtrain, version")
    assert "fit" in lmtrain("--help", check=0).stdout


def test_a_bad_input_in_a_real_process(tmp_path, trained):
    """tests/test_bad_inputs.py covers every case in-process; here two go through a real interpreter."""
    (tmp_path / "bad.yaml").write_text("train:\n  bach_size: 4\n")
    assert_one_line_error(
        lmtrain("fit", tmp_path / "bad.yaml"), "unknown key 'train.bach_size'; did you mean 'train.batch_size'?"
    )
    run, _ = trained
    assert_one_line_error(
        lmtrain("generate", "--ckpt", run / "checkpoints" / "best.npz", "--prompt", " "), "the prompt is empty"
    )


def test_debug_shows_the_traceback(tmp_path):
    proc = lmtrain("--debug", "fit", tmp_path / "absent.yaml")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
