"""Your own text: one file split by lines, the words tokenizer, presets by name, resuming a run directory,
scoring sentences, and the small things a new user meets on the way."""

import json
import math
import os

import numpy as np
import pytest

from tests.bad_inputs import run_main, write
from tests.test_cli import assert_one_line_error, lmtrain

BOOK = "\ufeff" + "".join(
    f'Speak, {w}! said the whale. "Don\'t speak," said {w}; it was 3.5 miles away.\r\n'
    for w in ["Ahab", "Starbuck", "Stubb", "Flask", "Queequeg", "Ishmael"] * 40
)


@pytest.fixture
def own_text_run():
    write("book.txt", BOOK.encode())
    code, out, err = run_main(
        [
            "fit",
            "own-text",
            "--set",
            "data.train=book.txt",
            "--set",
            "train.epochs=1",
            "--set",
            "model.hidden_size=32",
            "--set",
            "model.emb_size=32",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.eval_batch_size=2",
        ]
    )
    assert code == 0, err
    return out, "runs/own-text/checkpoints/best.npz"


def test_one_file_is_split_by_lines_and_read_as_words(own_text_run):
    out, ckpt = own_text_run
    assert "data.train split by lines (data.split [0.9, 0.05, 0.05]): train 216, valid 12, test 12 lines" in out
    vocab = json.load(open("runs/own-text/vocab.json"))
    assert vocab["tokenizer"] == "words" and vocab["lowercase"]
    assert {"speak", ",", "!", "don't", "3.5", '"', ";"} <= set(vocab["words"]) and "Speak," not in vocab["words"]
    assert "(0.0% <unk>)" in out  # every word seen at least twice


def test_the_split_is_the_same_every_time():
    from lmtrain.data.sources import split_lines

    write("t.txt", "".join(f"line {i}\n" for i in range(100)))
    first = split_lines(["t.txt"], [0.8, 0.1, 0.1], "cache", log=lambda *a: None)
    assert [len(open(first[s][0]).read().splitlines()) for s in ("train", "valid", "test")] == [80, 10, 10]
    assert open(first["test"][0]).read().splitlines()[0] == "line 90"
    assert split_lines(["t.txt"], [0.8, 0.1, 0.1], "cache", log=lambda *a: None) == first


def test_a_file_too_short_to_split_is_one_line():
    write("short.txt", "one line\n")
    write("c.yaml", "data: {source: text, train: short.txt}\n")
    code, _, err = run_main(["fit", "c.yaml"])
    assert code == 2 and "too few to split" in err


def test_the_reading_is_part_of_the_cache_key_and_the_vocabulary():
    from lmtrain.data.prepare import cache_key
    from lmtrain.data.tokenize import Reading

    write("a.txt", "x y\n")
    files = {s: ["a.txt"] for s in ("train", "valid", "test")}
    keys = {
        cache_key(files, 1, None, Reading(t, lc, n))
        for t in ("whitespace", "words")
        for lc in (False, True)
        for n in (None, "NFKC")
    }
    assert len(keys) == 8


def test_a_preset_runs_by_name_and_presets_lists_them():
    code, out, _ = run_main(["presets"])
    assert code == 0 and "quickstart" in out and "ptb-dlfs2" in out and "own-text" in out
    from lmtrain.preset import about, names, table
    from tests.conftest import ROOT

    assert all(set(about(name)) == {"corpus", "model", "time", "result"} for name in names())
    assert table() in (ROOT / "README.md").read_text()  # the README's table is regenerated: make docs
    code, out, err = run_main(["fit", "quickstart", "--set", "train.max_steps=3", "--set", "train.epochs=1", "--quiet"])
    assert code == 0, err
    assert os.path.isfile("runs/quickstart/checkpoints/best.npz")


def test_resume_a_run_directory_with_its_own_config(tiny_config):
    assert (
        run_main(
            [
                "fit",
                str(tiny_config),
                "--run-dir",
                "run",
                "--set",
                "train.max_steps=5",
                "--set",
                "model.hidden_size=12",
                "--quiet",
            ]
        )[0]
        == 0
    )
    code, out, err = run_main(["fit", "--resume", "run", "--set", "train.max_steps=10"])
    assert code == 0, err and "resuming from run/checkpoints/last.npz" in out
    events = [json.loads(line) for line in open("run/metrics.jsonl")]
    assert max(e["step"] for e in events) == 10
    code, _, err = run_main(["fit", "--resume", "run", "--set", "model.hidden_size=8"])
    assert code == 2 and "a run continues with its own config" in err


def test_an_interrupted_run_says_how_to_resume_its_directory(tiny_config, monkeypatch):
    import signal

    import lmtrain.training.run as run_module

    real = run_module.train_step

    def stop_at_step_3(*args, **kwargs):
        result = real(*args, **kwargs)
        if run_module.Run.__dict__.get("_steps", 0) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        run_module.Run._steps = run_module.Run.__dict__.get("_steps", 0) + 1
        return result

    monkeypatch.setattr(run_module, "train_step", stop_at_step_3)
    monkeypatch.setattr(run_module.Run, "_steps", 0, raising=False)
    code, _, err = run_main(["fit", str(tiny_config), "--run-dir", "run", "--quiet"])
    assert code == 130
    lines = err.strip().splitlines()
    assert lines[-1].startswith("stopped by SIGINT at step 3") and lines[-1].endswith("lmtrain fit --resume run")


def test_eval_defaults_to_the_latest_run_refuses_split_with_text_and_reports_bits(tiny_config):
    assert run_main(["fit", str(tiny_config), "--quiet"])[0] == 0
    code, out, err = run_main(["eval", "--json"])
    assert code == 0 and "using runs/tiny/checkpoints/best.npz" in err
    r = json.loads(out)
    assert r["bits_per_word"] == pytest.approx(r["loss"] / math.log(2)) and 0 <= r["unk"] < 0.01
    write("t.txt", "tom said hi to mary .\n")
    code, _, err = run_main(["eval", "--text", "t.txt", "--split", "valid"])
    assert code == 2 and "give one of them" in err


def test_eval_reads_a_split_whose_training_file_moved(own_text_run):
    _, ckpt = own_text_run
    write(
        "c.yaml",
        "data: {source: text, train: t.txt, valid: v.txt, test: v.txt}\n"
        "model: {emb_size: 8, hidden_size: 8}\ntrain: {batch_size: 2, bptt: 4, epochs: 1, eval_batch_size: 2}\n",
    )
    write("t.txt", "a b c d e f\n" * 20)
    write("v.txt", "a b c\n" * 5)
    assert run_main(["fit", "c.yaml", "--run-dir", "moved", "--quiet"])[0] == 0
    before = json.loads(run_main(["eval", "--ckpt", "moved/checkpoints/best.npz", "--json"])[1])
    os.rename("t.txt", "elsewhere.txt")
    code, out, err = run_main(["eval", "--ckpt", "moved/checkpoints/best.npz", "--json"])
    assert code == 0, err and json.loads(out)["ppl"] == before["ppl"]


def test_plot_without_matplotlib_is_an_error(tiny_config, monkeypatch):
    import sys

    assert run_main(["fit", str(tiny_config), "--run-dir", "run", "--set", "train.max_steps=3", "--quiet"])[0] == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_main(["plot", "run"])
    assert code == 2 and "no plot written" in err


# -- scoring -------------------------------------------------------------------------------------------------
@pytest.fixture
def float64_run(tiny_config):
    assert (
        run_main(
            [
                "fit",
                str(tiny_config),
                "--run-dir",
                "run",
                "--set",
                "train.dtype=float64",
                "--set",
                "train.epochs=1",
                "--quiet",
            ]
        )[0]
        == 0
    )
    return "run/checkpoints/best.npz"


def stories(n):
    from lmtrain.config import SyntheticConfig
    from lmtrain.data import synthetic

    return synthetic.generate_lines(SyntheticConfig(max_distance=4), "test", n) + ["tom said hi to zebra ."]


def test_stream_scores_add_up_to_eval_of_the_same_file(float64_run):
    write("s.txt", "\n".join(stories(30)) + "\n")
    code, out, err = run_main(["score", "--ckpt", float64_run, "--mode", "stream", "--json", "s.txt"])
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    total = sum(r["logprob"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    ev = json.loads(run_main(["eval", "--ckpt", float64_run, "--text", "s.txt", "--batch-size", "1", "--json"])[1])
    assert tokens == ev["tokens"] and -total / tokens == pytest.approx(ev["loss"], rel=1e-9)
    assert rows[-1]["unknown"] == ["zebra"]


def test_independent_scores_equal_each_line_alone(float64_run):
    from lmtrain.build import model_from_checkpoint
    from lmtrain.checkpoint import load_checkpoint
    from lmtrain.scoring import score

    model, vocab, _ = model_from_checkpoint(load_checkpoint(float64_run))
    lines = stories(40)
    batched = score(model, vocab, lines, "independent", batch_size=16)
    for line, s in zip(lines, batched):
        alone = score(model, vocab, [line], "independent", batch_size=1)[0]
        np.testing.assert_allclose(s["logp"], alone["logp"], rtol=1e-6, atol=1e-9)
    assert [s["text"] for s in batched] == lines  # in the input's order, whatever the batching's


def test_score_output_formats_and_bases(float64_run):
    write("s.txt", "tom said hi to mary .\n")
    e = json.loads(run_main(["score", "--ckpt", float64_run, "s.txt", "--json", "--per-word"])[1])
    ten = json.loads(run_main(["score", "--ckpt", float64_run, "s.txt", "--json", "--base", "10"])[1])
    assert e["tokens"] == 7 and [w for w, _ in e["words"]][-1] == "<eos>"
    assert sum(p for _, p in e["words"]) == pytest.approx(e["logprob"])
    assert ten["logprob"] == pytest.approx(e["logprob"] / math.log(10)) and ten["ppl"] == pytest.approx(e["ppl"])
    code, out, err = run_main(["score", "--ckpt", float64_run, "s.txt"])
    fields = out.strip().split("\t")
    assert code == 0 and float(fields[0]) == pytest.approx(e["logprob"], abs=1e-4) and fields[1] == "7"
    assert "bits per word" in err


@pytest.mark.parametrize(
    "content,message",
    [(b"", "no lines to score"), (b"ok\n\xff\xfe\n", "not UTF-8 text (bad byte on line 2)")],
    ids=["empty", "not-utf8"],
)
def test_score_bad_input(float64_run, content, message):
    write("bad.txt", content)
    assert_one_line_error(lmtrain("score", "--ckpt", float64_run, "bad.txt"), message)


def test_a_line_of_100000_words_is_scored_in_bounded_memory(float64_run):
    write("long.txt", " ".join(["tom", "said", "hi", "to", "mary", "."] * 16_667) + "\n")
    code, out, err = run_main(["score", "--ckpt", float64_run, "long.txt", "--json"])
    assert code == 0, err and json.loads(out)["tokens"] == 100_003


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--cache-window", "100"], "--cache-window applies only with --cache"),
        (["eval", "--dyn-lr", "0.001"], "--dyn-lr applies only with --dynamic"),
        (["score", "--mode", "stream", "--batch-size", "8", "s.txt"], "--batch-size applies to --mode independent"),
        (["generate", "--prompt", "tom", "--greedy", "--top-k", "3"], "--greedy takes the most likely word"),
    ],
    ids=["cache-window", "dyn-lr", "stream-batch", "greedy-top-k"],
)
def test_flags_that_do_not_apply_together_are_refused(tiny_config, argv, message):
    assert run_main(["fit", str(tiny_config), "--set", "train.max_steps=2", "--quiet"])[0] == 0
    write("s.txt", "tom\n")
    code, _, err = run_main(argv)
    assert code == 2 and message in err, err
