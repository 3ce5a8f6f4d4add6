"""Preparing a corpus: the streaming two-pass tokenizer, the content-keyed cache, memory-mapped splits."""

import hashlib
import json
import os
import tracemalloc

import numpy as np
import pytest

from lmtrain.data import corpus as corpus_mod
from lmtrain.data import prepare
from lmtrain.data.corpus import id_dtype, read_tokens
from lmtrain.data.download import sha256_file
from lmtrain.data.prepare import open_prepared, prepare_corpus
from lmtrain.data.tokenize import Reading
from lmtrain.data.vocab import EOS, Vocab
from lmtrain.errors import DataError
from tests.bad_inputs import run_main

SPLITS = ("train", "valid", "test")


def write_splits(root, train="the cat sat\nthe dog\n", valid="the cat\n", test="a dog\n"):
    os.makedirs(root, exist_ok=True)
    files = {}
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        path = os.path.join(root, f"{split}.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        files[split] = [path]
    return files


def quiet_log():
    lines = []
    return lines, lines.append


def test_prepare_writes_mapped_ids_and_the_vocabulary(tmp_path):
    files = write_splits(tmp_path / "txt")
    lines, log = quiet_log()
    corpus = prepare_corpus(files, str(tmp_path / "cache"), log=log)
    (directory,) = (tmp_path / "cache").glob("tokens-*")
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta.json",
        "test.npy",
        "train.npy",
        "valid.npy",
        "vocab.json",
    ]
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    assert not corpus.train.flags.writeable
    assert corpus.vocab.decode(corpus.train) == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    assert corpus.vocab.decode(corpus.test) == ["<unk>", "dog", EOS]  # "a" is not in the training split
    assert np.array_equal(np.load(directory / "valid.npy"), corpus.valid)
    assert Vocab.from_dict(json.loads((directory / "vocab.json").read_text())) == corpus.vocab
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["tokens"] == {"train": 7, "valid": 3, "test": 3} and meta["dtype"] == "uint16"
    assert any("tokens/s" in line for line in lines)


def test_ids_are_uint16_up_to_65536_words_and_uint32_beyond(tmp_path):
    assert id_dtype(1 << 16) == np.uint16 and id_dtype((1 << 16) + 1) == np.uint32
    words = [f"w{i}" for i in range(65600)]  # 65,602 with <eos> and <unk>
    files = write_splits(
        tmp_path / "txt",
        train="\n".join(" ".join(words[i : i + 20]) for i in range(0, 65600, 20)),
        valid="w0 w65599 new\n",
        test="w7\n",
    )
    corpus = prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
    assert len(corpus.vocab) == 65602 and corpus.train.dtype == np.uint32
    assert corpus.vocab.decode(corpus.valid) == ["w0", "w65599", "<unk>", EOS]
    assert int(corpus.train.max()) == 65601


def test_a_second_prepare_reuses_the_cache_without_tokenising(tmp_path, monkeypatch):
    files = write_splits(tmp_path / "txt")
    first = prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
    (directory,) = (tmp_path / "cache").glob("tokens-*")
    stamp = os.stat(directory / "train.npy").st_mtime_ns

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(prepare, "write_prepared", no_tokenising)
    lines, log = quiet_log()
    second = prepare_corpus(files, str(tmp_path / "cache"), log=log)
    assert lines == [f"prepared corpus: {directory}"]
    assert os.stat(directory / "train.npy").st_mtime_ns == stamp
    assert second.vocab == first.vocab and np.array_equal(second.train, first.train)


def test_the_key_follows_content_and_vocabulary_settings(tmp_path):
    files = write_splits(tmp_path / "txt")
    cache = str(tmp_path / "cache")
    prepare_corpus(files, cache, log=lambda *a: None)
    prepare_corpus(files, cache, reading=Reading(lowercase=True), log=lambda *a: None)
    prepare_corpus(files, cache, reading=Reading(tokenizer="words"), log=lambda *a: None)
    prepare_corpus(files, cache, min_freq=2, log=lambda *a: None)
    with open(files["train"][0], "a") as fh:
        fh.write("other words\n")
    assert "other" in prepare_corpus(files, cache, log=lambda *a: None).vocab.index
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 5


def old_npz_key(files, min_freq=1, max_size=None, lowercase=False):
    """The file name lmtrain's first cache format gave a corpus (data/cache/corpus-<key>.npz)."""
    h = hashlib.sha256(json.dumps([min_freq, max_size, lowercase]).encode())
    for s in SPLITS:
        h.update(sha256_file(files[s][0]).encode())
    return f"corpus-{h.hexdigest()[:20]}.npz"


def test_an_old_npz_cache_is_never_read(tmp_path):
    files = write_splits(tmp_path / "txt")
    cache = tmp_path / "cache"
    cache.mkdir()
    # an old-format cache of these very files, but holding other ids: reading it would give wrong ids
    old = cache / old_npz_key(files)
    fake = Vocab(["<eos>", "<unk>", "zebra"]).to_dict()
    np.savez(
        old,
        vocab=np.array(json.dumps(fake)),
        train=np.zeros(7, np.int32),
        valid=np.zeros(3, np.int32),
        test=np.zeros(3, np.int32),
    )
    before = old.read_bytes()
    lines, log = quiet_log()
    corpus = prepare_corpus(files, str(cache), log=log)
    assert "zebra" not in corpus.vocab.index
    assert corpus.vocab.decode(corpus.train) == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    assert old.read_bytes() == before  # left alone, and the user is told it can go
    assert any("no longer read" in line for line in lines)


@pytest.mark.parametrize("damage", ["truncate", "no-meta", "format"])
def test_a_damaged_cache_is_prepared_again(tmp_path, damage):
    files = write_splits(tmp_path / "txt")
    cache = str(tmp_path / "cache")
    prepare_corpus(files, cache, log=lambda *a: None)
    (directory,) = (tmp_path / "cache").glob("tokens-*")
    if damage == "truncate":
        data = (directory / "train.npy").read_bytes()
        (directory / "train.npy").write_bytes(data[:-4])
    elif damage == "no-meta":
        (directory / "meta.json").unlink()
    else:
        meta = json.loads((directory / "meta.json").read_text())
        (directory / "meta.json").write_text(json.dumps(dict(meta, format=1)))
    with pytest.raises(DataError, match="incomplete or damaged"):
        open_prepared(str(directory))
    lines, log = quiet_log()
    corpus = prepare_corpus(files, cache, log=log)
    assert any("preparing it again" in line for line in lines)
    assert corpus.vocab.decode(corpus.train) == ["the", "cat", "sat", EOS, "the", "dog", EOS]


def test_an_interrupted_prepare_leaves_no_cache(tmp_path, monkeypatch):
    files = write_splits(tmp_path / "txt")
    cache = tmp_path / "cache"
    real = prepare._write_ids

    def killed_at_valid(path, split, *args):
        if split == "valid":
            raise KeyboardInterrupt
        return real(path, split, *args)

    monkeypatch.setattr(prepare, "_write_ids", killed_at_valid)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(files, str(cache), log=lambda *a: None)
    assert list(cache.iterdir()) == []


def test_the_temporary_directory_of_a_killed_prepare_is_removed(tmp_path):
    import subprocess
    import sys

    files = write_splits(tmp_path / "txt")
    cache = tmp_path / "cache"
    key = prepare.cache_key(files, 1, None, Reading())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f".tmp-{key[:24]}-{int(dead.stdout)}"
    stale.mkdir(parents=True)
    (stale / "train.npy").write_bytes(b"half")
    prepare_corpus(files, str(cache), log=lambda *a: None)
    assert [p.name for p in cache.iterdir()] == [f"tokens-{key[:24]}"]


def test_blocks_give_the_same_tokens_and_line_numbers_whatever_their_size(tmp_path, monkeypatch):
    text = "".join(f"line {i} has words\n" if i % 7 else "\n" for i in range(300)) + "last line without end"
    path = tmp_path / "t.txt"
    path.write_text(text)
    expected = read_tokens(path)
    assert expected[-3:] == ["without", "end", EOS] and expected.count(EOS) == 301
    monkeypatch.setattr(corpus_mod, "BLOCK_BYTES", 50)
    assert read_tokens(path) == expected
    (tmp_path / "bad.txt").write_bytes(text.encode()[:3000] + b"\xff" + text.encode()[3000:])
    line = text.encode()[:3000].count(b"\n") + 1
    with pytest.raises(DataError, match=f"bad byte on line {line},"):
        read_tokens(tmp_path / "bad.txt")


def test_prepare_streams_in_blocks_instead_of_holding_the_corpus(tmp_path, monkeypatch):
    """Tokenising 400,000 tokens may not hold them at once: as Python strings they would take ~25 MB."""
    vocab = [f"word{i}" for i in range(2000)]
    rng = np.random.default_rng(0)
    lines = [" ".join(vocab[j] for j in rng.integers(0, 2000, 19)) for _ in range(20000)]
    files = write_splits(tmp_path / "txt", train="\n".join(lines) + "\n")
    monkeypatch.setattr(corpus_mod, "BLOCK_BYTES", 64 << 10)
    tracemalloc.start()
    try:
        corpus = prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(corpus.train) == 400000
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_without_the_cache_the_corpus_is_read_into_memory(tmp_path):
    files = write_splits(tmp_path / "txt")
    corpus = prepare.load_in_memory(files, log=lambda *a: None)
    assert not isinstance(corpus.train, np.memmap)
    assert corpus.vocab.decode(corpus.train) == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    assert not (tmp_path / "data").exists()


def test_text_splits_of_several_files_and_of_a_directory(tmp_path):
    from lmtrain.config import from_dict
    from lmtrain.data.sources import load_corpus

    (tmp_path / "a.txt").write_text("one two\nthree")  # no final line end: still an <eos>
    (tmp_path / "b.txt").write_text("four\n")
    parts = tmp_path / "parts"
    (parts / "sub").mkdir(parents=True)
    (parts / "2.txt").write_text("two two\n")
    (parts / "1.txt").write_text("one one\n")
    (parts / ".hidden").write_text("never read\n")
    (parts / "sub" / "x.txt").write_text("never read\n")
    cfg = from_dict(
        {
            "data": {
                "source": "text",
                "train": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                "valid": str(parts),
                "test": [str(parts), str(tmp_path / "b.txt")],
            }
        }
    )
    corpus = load_corpus(cfg.data, log=lambda *a: None)
    assert corpus.vocab.decode(corpus.train) == ["one", "two", EOS, "three", EOS, "four", EOS]
    assert corpus.vocab.decode(corpus.valid) == ["one", "one", EOS, "two", "two", EOS]
    assert len(corpus.test) == 8


def test_lmtrain_prepare_prints_tokens_per_second_then_reuses(tmp_path):
    write_splits("corpus")
    with open("t.yaml", "w") as fh:
        fh.write("data: {source: text, train: corpus/train.txt, valid: corpus/valid.txt, test: corpus/test.txt}\n")
    code, out, err = run_main(["prepare", "t.yaml"])
    assert code == 0, err
    assert "tokens/s" in out and "vocabulary 6 words; tokens: train 7 (0.0% <unk>), valid 3 (" in out
    code, out, err = run_main(["prepare", "t.yaml"])
    assert code == 0 and "tokens/s" not in out and "prepared corpus: data/cache/tokens-" in out
    code, out, err = run_main(
        ["fit", "t.yaml", "--set", "train.batch_size=1", "--set", "train.bptt=2", "--set", "train.epochs=1"]
    )
    assert code == 0, err
    assert "prepared corpus: data/cache/tokens-" in out and "tokenised" not in out  # fit reused it
    assert len(os.listdir("data/cache")) == 1


def test_training_reads_views_of_the_mapped_ids(tmp_path):
    from lmtrain.config import from_dict
    from lmtrain.training import Run, train_step

    files = write_splits(tmp_path / "txt", train="a b c d e f g h i j k l\n" * 20)
    corpus = prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
    cfg = from_dict({"model": {"emb_size": 4, "hidden_size": 4}, "train": {"batch_size": 4, "bptt": 5}})
    run = Run(cfg, str(tmp_path / "run"), corpus, quiet=True)
    assert np.shares_memory(run.streams.data, corpus.train)
    x, y = run.streams.data[0:5], run.streams.data[1:6]
    loss, norm, ok = train_step(run.model, run.optimizer, run.streams, x, y, 0.1, cfg.train.clip_grad_norm, run.world)
    assert ok and np.isfinite(loss)


def test_the_zipf_benchmark_corpus_is_exact_and_repeatable(tmp_path):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("zipf_corpus", ROOT / "benchmarks" / "zipf_corpus.py")
    zipf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zipf)
    for out in ("a", "b"):
        zipf.main([str(tmp_path / out), "--tokens", "20000", "--types", "3000", "--seed", "3"])
    for split in SPLITS:
        assert (tmp_path / "a" / f"{split}.txt").read_bytes() == (tmp_path / "b" / f"{split}.txt").read_bytes()
    files = {s: [str(tmp_path / "a" / f"{s}.txt")] for s in SPLITS}
    corpus = prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (20000, 50, 50)
    assert corpus.vocab.words[2] == "a" and len(corpus.vocab) <= 3002  # rank 1 is the most frequent


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_the_model_reads_strided_unsigned_ids_as_it_reads_int64(dtype):
    """The same window as a strided view of uint16 or uint32 ids, and as a contiguous int64 copy: the same
    loss and gradients (embedding dropout on, which indexes by the ids too)."""
    from lmtrain.config import ModelConfig
    from lmtrain.nn.model import LanguageModel

    V = 70000 if dtype == np.uint32 else 300
    ids = np.random.default_rng(1).integers(0, V, 4 * 13).astype(dtype)
    view = ids.reshape(4, 13).T  # (13, 4), as batchify lays out a mapped split
    results = []
    for x in (view, np.ascontiguousarray(view, dtype=np.int64)):
        model = LanguageModel(ModelConfig(emb_size=6, hidden_size=5, embedding_dropout=0.2), V, seed=4, dtype="float64")
        logits, _ = model.forward(x[:-1], model.init_state(4), train=True)
        loss = model.loss(logits, x[1:])
        model.backward()
        results.append((loss, model.store.grad.copy()))
    assert results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1])


def test_a_cache_directory_that_cannot_be_written_is_one_line(tmp_path):
    """The cache root is not a directory one can write into (here a file sits where it should be)."""
    files = write_splits(tmp_path / "txt")
    (tmp_path / "cache").write_text("a file, not a directory")
    with pytest.raises(DataError, match="cannot create the corpus cache .*: Not a directory"):
        prepare_corpus(files, str(tmp_path / "cache"), log=lambda *a: None)
