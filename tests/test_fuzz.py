"""Every reader of a file lmtrain did not just write, against damaged copies of such files.

Each reader gets a few hundred seeded mutations of a real file: bytes flipped, the file cut short, bytes
inserted.  Each must end in the same result as the undamaged file (a damaged cache is prepared again,
damaged statistics computed again) or in a one-line error with exit code 2: never another exception, a
hang (pytest-timeout) or a different number.  ``python -m tests.test_fuzz`` prints the counts.
"""

import os
import shutil
import time
from collections import Counter

import numpy as np
import pytest

from lmtrain.errors import LmtrainError

MUTATIONS = 300


def mutations(data, n=MUTATIONS, seed=0):
    """``n`` damaged copies of ``data`` (bytes), a third each of: 1-4 bytes flipped, cut short, bytes inserted."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        out = bytearray(data)
        if k % 3 == 0:
            for at in rng.integers(0, len(out), rng.integers(1, 5)):
                out[at] ^= int(rng.integers(1, 256))
        elif k % 3 == 1:
            out = out[: int(rng.integers(0, len(out)))]
        else:
            at = int(rng.integers(0, len(out) + 1))
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        yield bytes(out)


def outcome(run, same):
    """ "same" when ``run()`` gives what ``same(result)`` accepts, "error" for a one-line LmtrainError with exit
    code 2; anything else fails the test."""
    try:
        result = run()
    except LmtrainError as err:
        assert err.exit_code == 2 and "\n" not in str(err) and str(err), repr(err)
        return "error"
    assert same(result), "a damaged file gave another result"
    return "same"


@pytest.fixture
def checkpoint(tiny_config):
    from lmtrain.config import load_config
    from lmtrain.training import fit

    fit(load_config(tiny_config, ["train.max_steps=20"]), "run", quiet=True)
    return "run/checkpoints/last.npz"


def fuzz_checkpoint(path):
    from lmtrain.build import model_from_checkpoint
    from lmtrain.checkpoint import load_checkpoint

    original = {k: v.copy() for k, v in load_checkpoint(path).params.items()}

    def load(damaged):
        with open("damaged.npz", "wb") as fh:
            fh.write(damaged)
        model, _, _ = model_from_checkpoint(load_checkpoint("damaged.npz"), kernels="numpy")
        return model.params

    data = open(path, "rb").read()
    return Counter(
        outcome(lambda: load(d), lambda p: all(np.array_equal(p[k], original[k]) for k in original))
        for d in mutations(data)
    )


def test_checkpoints(checkpoint):
    counts = fuzz_checkpoint(checkpoint)
    assert sum(counts.values()) == MUTATIONS and counts["error"] > MUTATIONS / 2


WORDS = "the cat sat on the mat . a dog ran after the cat . the mat was red .\n"


@pytest.fixture
def text_files():
    os.makedirs("txt", exist_ok=True)
    files = {}
    for split, lines in (("train", 20), ("valid", 3), ("test", 3)):
        path = f"txt/{split}.txt"
        with open(path, "w") as fh:
            fh.write(WORDS * lines)
        files[split] = [path]
    return files


def fuzz_token_cache(files, n=MUTATIONS):
    from lmtrain.data.prepare import prepare_corpus

    corpus = prepare_corpus(files, "cache", log=lambda *a: None)
    original = {s: np.array(corpus.split(s)) for s in ("train", "valid", "test")}, corpus.vocab
    (directory,) = [os.path.join("cache", d) for d in os.listdir("cache")]
    pristine = {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}

    def same(c):
        return c.vocab == original[1] and all(np.array_equal(c.split(s), a) for s, a in original[0].items())

    counts = Counter()
    for k, name in enumerate(pristine):  # every file of the cache in turn
        for damaged in mutations(pristine[name], n // len(pristine), seed=k):
            if os.path.isdir(directory):
                shutil.rmtree(directory)
            os.makedirs(directory)
            for other, data in pristine.items():
                with open(os.path.join(directory, other), "wb") as fh:
                    fh.write(damaged if other == name else data)
            counts[outcome(lambda: prepare_corpus(files, "cache", log=lambda *a: None), same)] += 1
    return counts


def test_token_caches(text_files):
    counts = fuzz_token_cache(text_files)
    assert counts["same"] == sum(counts.values()) >= MUTATIONS - 5  # every damaged cache is prepared again


def fuzz_dynamic_stats(path, n=MUTATIONS // 5):
    from lmtrain.adapt import gradient_stats, stats_path
    from lmtrain.commands import load_for_eval

    loaded, model, _, cfg, corpus_of = load_for_eval(path, log=lambda *a: None, kernels="numpy")
    train = corpus_of().train
    original = gradient_stats(
        model, train, cfg.train.bptt, loaded.path, loaded.sha256, progress=False, echo=lambda *a: None
    )
    stats = stats_path(loaded.path, loaded.sha256)
    data = open(stats, "rb").read()
    counts = Counter()
    for damaged in mutations(data, n):
        with open(stats, "wb") as fh:
            fh.write(damaged)
        counts[
            outcome(
                lambda: gradient_stats(
                    model, train, cfg.train.bptt, loaded.path, loaded.sha256, progress=False, echo=lambda *a: None
                ),
                lambda ms: np.array_equal(ms, original),
            )
        ] += 1
    return counts


def test_dynamic_evaluation_statistics(checkpoint):
    counts = fuzz_dynamic_stats(checkpoint)
    assert counts["same"] == sum(counts.values())  # damaged statistics are computed again


def fuzz_metrics(tiny_config):
    """metrics.jsonl as resuming reads it: the events kept and the clock, or a one-line error."""
    from lmtrain.run_dir import MetricsLog

    data = open("run/metrics.jsonl", "rb").read()
    counts = Counter()
    for damaged in mutations(data):
        with open("damaged.jsonl", "wb") as fh:
            fh.write(damaged)
        counts[
            outcome(
                lambda: MetricsLog("damaged.jsonl").truncate_after(10), lambda r: isinstance(r[0], float) and r[1] >= 0
            )
        ] += 1
    return counts


def test_metrics_logs_on_resume(checkpoint, tiny_config):
    counts = fuzz_metrics(tiny_config)
    assert sum(counts.values()) == MUTATIONS and counts["error"] > 0


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from tests.conftest import TINY

    os.chdir(tempfile.mkdtemp())
    Path("tiny.yaml").write_text(TINY)
    from lmtrain.config import load_config
    from lmtrain.training import fit

    fit(load_config("tiny.yaml", ["train.max_steps=20"]), "run", quiet=True)
    os.makedirs("txt")
    files = {}
    for split, lines in (("train", 20), ("valid", 3), ("test", 3)):
        Path(f"txt/{split}.txt").write_text(WORDS * lines)
        files[split] = [f"txt/{split}.txt"]
    for name, run in [
        ("checkpoint", lambda: fuzz_checkpoint("run/checkpoints/last.npz")),
        ("token cache", lambda: fuzz_token_cache(files)),
        ("dynamic evaluation statistics", lambda: fuzz_dynamic_stats("run/checkpoints/last.npz")),
        ("metrics.jsonl on resume", lambda: fuzz_metrics("tiny.yaml")),
    ]:
        start = time.perf_counter()
        counts = run()
        print(
            f"{name:32s} {sum(counts.values()):4d} mutations: {counts['same']:4d} same result, "
            f"{counts['error']:4d} one-line errors, {time.perf_counter() - start:.1f} s"
        )
