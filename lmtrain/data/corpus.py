"""Reading text into tokens and tokens into id arrays.

Format (the Penn Treebank's): tokens separated by whitespace, and each line
end becomes ``<eos>``.  The vocabulary comes from the training split only.
"""
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from lmtrain.data.vocab import EOS, Vocab
from lmtrain.errors import DataError, require_file

SPLITS = ("train", "valid", "test")


# A line longer than this is not text meant for a word-level model (a file
# without line breaks, a binary blob); reading stops instead of filling memory.
MAX_LINE_BYTES = 16 << 20


def read_lines(path, what="corpus file"):
    """Yield the decoded lines of a UTF-8 text file, one at a time.

    A missing, binary or non-UTF-8 file, or a line over MAX_LINE_BYTES, is a
    DataError that names the file and the line.
    """
    path = require_file(path, what, DataError)
    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{what} {path}: line {number} is longer than {MAX_LINE_BYTES >> 20} MiB; "
                                    f"a corpus needs line breaks (one sentence or paragraph per line)")
                if b"\x00" in raw:
                    raise DataError(f"{what} {path} looks binary (NUL byte on line {number}), not text")
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{what} {path} is not UTF-8 text (bad byte on line {number}, column "
                                    f"{err.start + 1})") from None
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err.strerror}") from None


def read_tokens(path, what="corpus file", lowercase=False):
    """Whitespace-separated tokens of a file, with ``<eos>`` at every line end."""
    return tokenize_lines(read_lines(path, what), lowercase)


def tokenize_lines(lines, lowercase=False):
    tokens = []
    for line in lines:
        tokens.extend((line.lower() if lowercase else line).split())
        tokens.append(EOS)
    return tokens


def tokenize(text, lowercase=False):
    """Whitespace-separated tokens with ``<eos>`` at every line end (\\n)."""
    return tokenize_lines(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), lowercase)


@dataclass
class Corpus:
    vocab: Vocab
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def split(self, name):
        return getattr(self, name)

    def describe(self):
        return (f"vocabulary {len(self.vocab):,} words; tokens: train {len(self.train):,}, "
                f"valid {len(self.valid):,}, test {len(self.test):,}")


def build_corpus(split_tokens, min_freq=1, max_size=None, lowercase=False, names=None):
    """Vocabulary from the training tokens, then every split encoded as int32 ids."""
    names = names or {s: s for s in SPLITS}
    for split in SPLITS:
        if not split_tokens[split] or all(t == EOS for t in split_tokens[split]):
            raise DataError(f"the {split} split ({names[split]}) has no tokens")
    vocab = Vocab.build(Counter(split_tokens["train"]), min_freq=min_freq, max_size=max_size,
                        lowercase=lowercase)
    return Corpus(vocab, *(vocab.encode(split_tokens[s]) for s in SPLITS))


def load_text_corpus(paths, min_freq=1, max_size=None, lowercase=False, cache_dir=None):
    """Read train/valid/test files (``paths``: split -> path) into a Corpus.

    With ``cache_dir`` the encoded result is stored under a key made of the
    files' contents and the vocabulary settings, so a second run skips the
    tokenisation.  A cache that cannot be written is simply not used.
    """
    key = None
    if cache_dir is not None:
        h = hashlib.sha256(json.dumps([min_freq, max_size, lowercase]).encode())
        for s in SPLITS:
            h.update(sha256_file(require_file(paths[s], f"{s} file", DataError)).encode())
        key = os.path.join(cache_dir, f"corpus-{h.hexdigest()[:20]}.npz")
        cached = _read_cache(key)
        if cached is not None:
            return cached
    corpus = build_corpus({s: read_tokens(paths[s], f"{s} file", lowercase) for s in SPLITS},
                          min_freq=min_freq, max_size=max_size, lowercase=lowercase,
                          names={s: paths[s] for s in SPLITS})
    if key is not None:
        _write_cache(key, corpus)
    return corpus


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_cache(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            vocab = Vocab.from_dict(json.loads(str(z["vocab"])))
            return Corpus(vocab, z["train"], z["valid"], z["test"])
    except Exception:  # absent or unreadable: rebuild
        return None


def _write_cache(path, corpus):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            np.savez(fh, vocab=np.array(json.dumps(corpus.vocab.to_dict())),
                     train=corpus.train, valid=corpus.valid, test=corpus.test)
        os.replace(tmp, path)
    except OSError:
        pass
