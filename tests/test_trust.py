"""Nothing read back is trusted: each case is one of the ways lmtrain once gave a silently wrong number,
broke a run for good or lost a signal (docs/reliability.md), through the command line a user runs."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from tests.bad_inputs import run_main, write
from tests.conftest import optional
from tests.test_cli import assert_one_line_error, lmtrain

TEXT = """\
data: {source: text, train: corpus/train.txt, valid: corpus/valid.txt, test: corpus/test.txt}
model: {emb_size: 8, hidden_size: 8}
train: {batch_size: 2, bptt: 4, epochs: 1, optimizer: adam, lr: 0.01, eval_batch_size: 2}
"""
WORDS = "the cat sat on the mat . a dog ran after the cat . the mat was red .\n"


@pytest.fixture
def text_run(tmp_path):
    """A run on a small text corpus: (its config, its best checkpoint)."""
    for split, lines in (("train", 30), ("valid", 3), ("test", 3)):
        write(f"corpus/{split}.txt", WORDS * lines)
    write("text.yaml", TEXT)
    code, _, err = run_main(["fit", "text.yaml", "--run-dir", "run", "--quiet"])
    assert code == 0, err
    return "text.yaml", "run/checkpoints/best.npz"


def mutate_training_text():
    """The same number of words, another order of frequencies: a vocabulary of the same size, other ids."""
    write("corpus/train.txt", WORDS.replace("the", "zzz").replace("cat", "the").replace("zzz", "cat") * 30)


# -- 1. evaluation never checked the vocabulary ----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--ckpt", "run/checkpoints/best.npz"],
        ["tune-eval", "--ckpt", "run/checkpoints/best.npz", "--method", "cache"],
        [
            "probe",
            "gradflow",
            "--ckpt",
            "run/checkpoints/best.npz",
            "--steps",
            "3",
            "--batches",
            "1",
            "--plot",
            "g.png",
        ],
        ["fit", "text.yaml", "--run-dir", "run", "--resume"],
    ],
    ids=["eval", "tune-eval", "gradflow", "resume"],
)
def test_a_corpus_that_now_gives_another_vocabulary_is_refused(text_run, argv):
    """Before: eval printed a perplexity of ids read through the wrong words (exit 0)."""
    mutate_training_text()
    code, out, err = run_main(argv)
    assert code == 2, (out, err)
    assert "another vocabulary" in err and "word 2 was 'the', is 'cat'" in err
    assert "perplexity" not in out


def test_eval_still_evaluates_the_corpus_it_was_trained_on(text_run):
    code, out, err = run_main(["eval", "--ckpt", "run/checkpoints/best.npz", "--json"])
    assert code == 0, err and np.isfinite(json.loads(out)["ppl"])


# -- 2. the token cache was trusted beyond its shape ---------------------------------------------------------
def cache_dir():
    (found,) = [os.path.join("data/cache", d) for d in os.listdir("data/cache") if d.startswith("tokens-")]
    return found


def flip_byte(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def swap_two_words(path):
    vocab = json.load(open(path, encoding="utf-8"))
    vocab["words"][2], vocab["words"][3] = vocab["words"][3], vocab["words"][2]
    write(path, json.dumps(vocab))


def flip_lowercase(path):
    vocab = json.load(open(path, encoding="utf-8"))
    vocab["lowercase"] = not vocab["lowercase"]
    write(path, json.dumps(vocab))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: flip_byte(os.path.join(d, "train.npy"), 200),
        lambda d: swap_two_words(os.path.join(d, "vocab.json")),
        lambda d: flip_lowercase(os.path.join(d, "vocab.json")),
    ],
    ids=["byte-in-ids", "swapped-words", "lowercase"],
)
def test_a_damaged_token_cache_is_prepared_again(text_run, damage):
    """Before: the damaged cache was used as it was (another perplexity, or ids the vocabulary lacks)."""
    from lmtrain.config import load_config
    from lmtrain.data.sources import load_corpus

    before = load_corpus(load_config("text.yaml").data, log=lambda *a: None)
    train, vocab = np.array(before.train), before.vocab
    damage(cache_dir())
    lines = []
    after = load_corpus(load_config("text.yaml").data, log=lines.append)
    assert any("damaged" in line and "preparing it again" in line for line in lines), lines
    assert np.array_equal(after.train, train) and after.vocab == vocab


def test_an_id_beyond_the_vocabulary_is_refused_even_with_the_checksums_redone(text_run):
    """The largest id is checked against the vocabulary, not only recorded."""
    from lmtrain.data.prepare import open_prepared
    from lmtrain.errors import DataError

    directory = cache_dir()
    meta = json.load(open(os.path.join(directory, "meta.json")))
    meta["checks"]["train"]["max_id"] = meta["vocab_size"]
    write(os.path.join(directory, "meta.json"), json.dumps(meta))
    with pytest.raises(DataError, match="largest id .* is not a word of the vocabulary"):
        open_prepared(directory)


# -- 3. a launcher that does not match mpi4py ------------------------------------------------------------------
def test_a_launcher_mpi4py_cannot_see_is_refused(tiny_config):
    """Before: each of the launcher's N processes trained alone, all into one run directory."""
    optional("mpi4py", "pip install -e .[mpi]")
    proc = lmtrain("fit", tiny_config, env={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    assert proc.returncode == 2, proc.stderr
    assert "the launcher started 2 processes, but mpi4py sees a world of 1" in proc.stderr
    assert not os.path.exists("runs")


# -- 4. two runs in one run directory --------------------------------------------------------------------------
def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_a_second_fit_on_a_run_directory_in_use_is_refused(tiny_config):
    """Before: both ran, interleaving metrics.jsonl and replacing each other's checkpoints."""
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmtrain",
            "fit",
            str(tiny_config),
            "--set",
            "train.epochs=50",
            "--run-dir",
            "run",
            "--quiet",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: os.path.exists("run/metrics.jsonl") or first.poll() is not None, "the first run to start")
        for extra in (["--resume"], ["--overwrite"]):
            second = lmtrain("fit", tiny_config, "--run-dir", "run", *extra)
            assert_one_line_error(second, f"run directory run is in use by process {first.pid} on ")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, first.stderr.read()
    assert lmtrain("fit", tiny_config, "--run-dir", "run", "--resume").returncode == 0


# -- 5. a torn last line of metrics.jsonl ----------------------------------------------------------------------
def test_resume_tolerates_and_reports_a_torn_last_line(tiny_config):
    """Before: every --resume failed with a JSON error."""
    assert run_main(["fit", str(tiny_config), "--run-dir", "run", "--set", "train.max_steps=40", "--quiet"])[0] == 0
    with open("run/metrics.jsonl", "a") as fh:
        fh.write('{"event": "train", "epoch": 1, "ste')
    code, out, err = run_main(["fit", str(tiny_config), "--run-dir", "run", "--set", "train.max_steps=80", "--resume"])
    assert code == 0, err
    assert "last line of run/metrics.jsonl was cut off (35 bytes" in out
    events = [json.loads(line) for line in open("run/metrics.jsonl")]
    assert events[-1]["event"] == "test" and max(e["step"] for e in events) == 80


# -- 6. signals at the end of a run, and a job-wide SIGTERM --------------------------------------------------------
def test_a_signal_during_the_final_evaluation_ends_with_its_status(tiny_config, monkeypatch):
    """Before: acknowledged, ignored, exit 0."""
    import lmtrain.training.run as run_module

    real = run_module.evaluate

    def test_pass_interrupted(model, ids, *args, **kwargs):
        if len(ids) == 678:  # the test split of tiny_config
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", test_pass_interrupted)
    code, _, err = run_main(["fit", str(tiny_config), "--run-dir", "run", "--set", "train.epochs=1", "--quiet"])
    assert code == 143, err
    assert "stopped by SIGTERM at the end of the run" in err


def test_a_job_wide_sigterm_counts_once(tiny_config):
    """The same SIGTERM twice within a moment (every process of a job, and the MPI supervisor's forwarded copy):
    one orderly stop with its checkpoint.  Before: the second one quit at once, without a checkpoint."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmtrain",
            "fit",
            str(tiny_config),
            "--set",
            "train.epochs=50",
            "--run-dir",
            "run",
            "--quiet",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: os.path.exists("run/metrics.jsonl") or proc.poll() is not None, "the run to start")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)  # apart enough not to merge into one pending signal, as two processes' copies would not
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert "checkpoint saved to run/checkpoints/last.npz" in proc.stderr.read()


# -- 7. config input ---------------------------------------------------------------------------------------------
BOMB = (
    "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "train: {lr: *i}\n"
)


@pytest.mark.parametrize(
    "argv",
    [["fit", "bomb.yaml"], ["fit", "ok.yaml", "--set", "train.lr=" + BOMB.replace("\n", "\n  ")]],
    ids=["file", "--set"],
)
def test_an_alias_bomb_is_refused_in_one_short_line(argv):
    """Before: the message printed the expanded value, hundreds of megabytes."""
    assert len(BOMB) < 1024
    write("bomb.yaml", BOMB)
    write("ok.yaml", "seed: 1\n")
    start = time.monotonic()
    code, out, err = run_main(argv)
    assert code == 2 and len(err) < 400 and time.monotonic() - start < 10, err[:400]
    assert "expand to more than 100,000 values" in err or "must be a number" in err


def test_the_numbers_people_write_and_merge_keys_are_read():
    """Before: lr: 1e-3 was a string ("must be a number"), and a merge key a constructor traceback's text."""
    from lmtrain.config import load_config

    write("c.yaml", "defaults: &d {lr: 1e-3, epochs: 2}\n")
    write("c.yaml", "train:\n  <<: {lr: 1e-3, epochs: 2}\n  epochs: 3\n  min_lr: 5E-5\n")
    cfg = load_config("c.yaml")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.min_lr) == (0.001, 3, 5e-5)
    assert load_config("c.yaml", ["train.lr=2e-2"]).train.lr == 0.02


def test_every_unknown_key_is_named_with_the_key_people_mean():
    write("c.yaml", "train: {learning_rate: 1, bach_size: 3}\n")
    code, _, err = run_main(["fit", "c.yaml"])
    assert code == 2
    assert (
        "unknown keys 'train.learning_rate' (did you mean 'train.lr'?), 'train.bach_size' (did you mean "
        "'train.batch_size'?)" in err
    )


# -- 8. checkpoint edges -----------------------------------------------------------------------------------------
def npz_with_header(path, shape, extra=b"\0" * 16):
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("meta.npy", header.getvalue() + extra)


def test_a_header_that_claims_more_than_its_member_holds_is_a_checkpoint_error():
    """Before: MemoryError, exit 1."""
    npz_with_header("huge.npz", (2**40,))
    assert os.path.getsize("huge.npz") < 400
    assert_one_line_error(lmtrain("eval", "--ckpt", "huge.npz"), "claims shape (1099511627776,)")


def test_deeply_nested_meta_is_a_checkpoint_error():
    """Before: RecursionError, exit 1."""
    from lmtrain.checkpoint import save_checkpoint

    save_checkpoint("deep.npz", {"w": np.zeros(2, np.float32)}, {})
    with np.load("deep.npz") as z:
        arrays = {k: z[k] for k in z.files}
    from lmtrain.checkpoint import write_npz
    from tests.bad_inputs import documented_sha256

    arrays.pop("sha256")
    arrays["meta"] = np.array("[" * 100_000 + "]" * 100_000)
    arrays["sha256"] = np.array(documented_sha256(arrays))
    with open("deep.npz", "wb") as fh:
        write_npz(fh, arrays)
    assert_one_line_error(lmtrain("eval", "--ckpt", "deep.npz"), "its 'meta' entry is not JSON")


# -- 10. smaller -------------------------------------------------------------------------------------------------
def test_a_byte_order_mark_does_not_stick_to_the_first_word():
    """Before: the first word of a file saved by Notepad was '\\ufeffthe', another word than 'the'."""
    from lmtrain.data.corpus import read_tokens

    write("bom.txt", "\ufeffthe cat\r\nthe dog\r\n".encode())
    assert read_tokens("bom.txt") == ["the", "cat", "<eos>", "the", "dog", "<eos>"]


def test_truncated_dynamic_evaluation_statistics_are_computed_again(text_run):
    """Before: `eval --dynamic` failed until the file was deleted by hand."""
    argv = ["eval", "--ckpt", "run/checkpoints/best.npz", "--dynamic", "--json"]
    code, out, err = run_main(argv)
    assert code == 0, err
    first = json.loads(out)["results"]["dynamic"]["ppl"]
    (stats,) = [f for f in os.listdir("run/checkpoints") if ".dynstats-" in f]
    path = os.path.join("run/checkpoints", stats)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    code, out, err = run_main(argv)
    assert code == 0, err
    assert json.loads(out)["results"]["dynamic"]["ppl"] == first


def test_a_model_too_large_to_build_leaves_no_run_directory(tiny_config, monkeypatch):
    """Before: the run directory was made first, and the next fit refused it as another run's."""
    import importlib

    fit_module = importlib.import_module("lmtrain.training.fit")  # the package's name fit is the function

    def too_large(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(fit_module, "Run", too_large)
    code, _, err = run_main(["fit", str(tiny_config), "--run-dir", "run"])
    assert code == 1 and "not enough memory for this model" in err
    assert not os.path.exists("run")


def test_the_keys_safe_to_change_on_resume_are_one_list_and_documented():
    """Before: 17 keys in the code, 14 in the docs."""
    from lmtrain.config import SAFE_ON_RESUME, SAFE_TO_CHANGE_ON_RESUME, safe_keys_table
    from tests.conftest import ROOT

    assert set(SAFE_ON_RESUME) == SAFE_TO_CHANGE_ON_RESUME
    assert safe_keys_table() in (ROOT / "docs" / "reliability.md").read_text()
