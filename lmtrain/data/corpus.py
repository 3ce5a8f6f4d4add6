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
from lmtrain.errors import DataError

SPLITS = ("train", "valid", "test")


def read_text(path, what="corpus file"):
    """The text of a UTF-8 file; a missing, binary or non-UTF-8 file is a DataError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{what} is a directory, not a file: {path}")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err.strerror}") from None
    if b"\x00" in raw[:1 << 16]:
        raise DataError(f"{what} {path} looks binary (it contains NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{what} {path} is not UTF-8 text (bad byte at line {line}, offset {err.start})") from None


def tokenize(text, lowercase=False):
    """Whitespace-separated tokens with ``<eos>`` at every line end."""
    if lowercase:
        text = text.lower()
    tokens = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


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
    texts = {s: read_text(paths[s], f"{s} file") for s in SPLITS}
    key = None
    if cache_dir is not None:
        h = hashlib.sha256(json.dumps([min_freq, max_size, lowercase]).encode())
        for s in SPLITS:
            h.update(hashlib.sha256(texts[s].encode("utf-8")).digest())
        key = os.path.join(cache_dir, f"corpus-{h.hexdigest()[:20]}.npz")
        cached = _read_cache(key)
        if cached is not None:
            return cached
    corpus = build_corpus({s: tokenize(texts[s], lowercase) for s in SPLITS},
                          min_freq=min_freq, max_size=max_size, lowercase=lowercase,
                          names={s: paths[s] for s in SPLITS})
    if key is not None:
        _write_cache(key, corpus)
    return corpus


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
