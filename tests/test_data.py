from collections import Counter

import numpy as np
import pytest

from lmtrain.config import SyntheticConfig
from lmtrain.data import synthetic
from lmtrain.data.batching import batchify, eval_streams, get_batch, window_starts
from lmtrain.data.corpus import build_corpus, read_tokens
from lmtrain.data.prepare import prepare_corpus
from lmtrain.data.vocab import EOS, UNK, Vocab
from lmtrain.errors import DataError


def test_vocab_min_freq_max_size_and_stable_order():
    counts = Counter({"the": 5, "cat": 2, "dog": 2, "rare": 1})
    v = Vocab.build(counts, min_freq=2)
    assert v.words == [EOS, UNK, "the", "cat", "dog"]  # ties broken alphabetically
    assert Vocab.build(counts, max_size=3).words == [EOS, UNK, "the"]
    assert list(v.encode(["the", "rare", EOS])) == [2, v.unk_id, v.eos_id]
    assert v.encode(["the"]).dtype == np.int32
    assert Vocab.from_dict(v.to_dict()) == v


def test_vocab_comes_from_training_split_only():
    c = build_corpus({"train": ["a", "b", EOS], "valid": ["c", EOS], "test": ["a", EOS]})
    assert "c" not in c.vocab.index
    assert list(c.valid) == [c.vocab.unk_id, c.vocab.eos_id]


def test_read_tokens_rejects_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_tokens(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is a directory"):
        read_tokens(tmp_path)
    (tmp_path / "bin").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DataError, match="looks binary"):
        read_tokens(tmp_path / "bin")
    (tmp_path / "latin1").write_bytes("ok\ncaf\xe9 ok\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text .*line 2, column 4"):
        read_tokens(tmp_path / "latin1")


def test_a_line_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    from lmtrain.data import corpus

    monkeypatch.setattr(corpus, "MAX_LINE_BYTES", 1000)
    (tmp_path / "long.txt").write_text("short line\n" + "w " * 600 + "\n")
    with pytest.raises(DataError, match="line 2 is longer than"):
        read_tokens(tmp_path / "long.txt")
    (tmp_path / "ok.txt").write_text("w " * 400 + "\nend")
    assert read_tokens(tmp_path / "ok.txt")[-2:] == ["end", EOS]


def test_empty_split_is_an_error(tmp_path):
    for name, text in [("train", "a b\n"), ("valid", "\n\n"), ("test", "a\n")]:
        (tmp_path / f"{name}.txt").write_text(text)
    files = {s: [str(tmp_path / f"{s}.txt")] for s in ("train", "valid", "test")}
    with pytest.raises(DataError, match="valid split .* has no tokens"):
        prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
    assert not any((tmp_path / "cache").glob("tokens-*"))


def test_batchify_and_windows_read_each_stream_in_order():
    ids = np.arange(23, dtype=np.int32)
    data = batchify(ids, 4)  # 5 rows, 3 tokens dropped
    assert data.shape == (5, 4) and list(data[:, 1]) == [5, 6, 7, 8, 9]
    assert np.shares_memory(data, ids)  # a view: the ids may be a memory-mapped file
    pairs = [get_batch(data, i, 3) for i in window_starts(data, 3)]
    assert len(pairs) == 2
    assert pairs[1][0].shape == (1, 4)
    xs = np.concatenate([x for x, _ in pairs])
    ys = np.concatenate([y for _, y in pairs])
    assert np.array_equal(ys, xs + 1)  # every target is the next token of its stream


@pytest.mark.parametrize("n,batch", [(2, 1), (10, 3), (101, 10), (5, 8)])
def test_eval_streams_count_every_target_once(n, batch):
    ids = np.arange(n, dtype=np.int32) + 100
    data, w = eval_streams(ids, batch)
    x, y = get_batch(data, 0, len(data))
    assert x.shape == y.shape == w.shape and w.sum() == n - 1
    pairs = sorted(zip(x[w > 0].tolist(), y[w > 0].tolist()))
    assert pairs == [(100 + i, 101 + i) for i in range(n - 1)]


def test_synthetic_stories_are_deterministic_and_answerable():
    cfg = SyntheticConfig(train_stories=200, min_distance=3, max_distance=9)
    lines = synthetic.generate_lines(cfg, "train")
    assert lines == synthetic.generate_lines(cfg, "train")
    assert lines != synthetic.generate_lines(cfg, "valid")
    for line in lines:
        words = line.split()
        a, b = words[0], words[words.index("came") - 1]
        q = words.index("said")
        assert words[q - 1] == b and words[q + 3] == a and a != b
        assert a not in words[1 : q - 1]  # the name to remember is not repeated in between


@pytest.mark.parametrize("distance", [0, 1, 2, 7, 40])
def test_synthetic_distance_is_exact(distance):
    rng = np.random.default_rng(0)
    for _ in range(20):
        tokens, answer = synthetic.story(rng, distance)
        second_end = tokens.index(".", tokens.index("came"))
        question = answer - 4
        assert question - (second_end + 1) == distance
        assert not set(tokens[second_end + 1 : question]) & set(synthetic.NAMES)


def test_ptb_token_counts(ptb, tmp_path):
    from lmtrain.data.sources import ensure_ptb

    files = {s: [p] for s, p in ensure_ptb(str(ptb), allow_download=False).items()}
    corpus = prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
    assert len(corpus.vocab) == 10000
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (929589, 73760, 82430)
