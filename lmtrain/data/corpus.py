"""Reading text into tokens, and the Corpus: a vocabulary and one id array per split.

Format (the Penn Treebank's and WikiText's): tokens separated by whitespace,
and each line end becomes ``<eos>`` (a blank line included).  A file is read
in blocks of whole lines, so no file is ever held in memory as a whole, and a
block's tokens are one ``str.split`` (C speed) rather than a loop per line.
"""
from collections import Counter
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from lmtrain.data.tokenize import Reading
from lmtrain.data.vocab import EOS, Vocab
from lmtrain.errors import DataError, require_file

SPLITS = ("train", "valid", "test")


# A line longer than this is not text meant for a word-level model (a file
# without line breaks, a binary blob); reading stops instead of filling memory.
MAX_LINE_BYTES = 16 << 20
BLOCK_BYTES = 4 << 20  # read size: a block's tokens as Python strings take ~15x this


def read_blocks(path, what="corpus file"):
    """Yield (text, nbytes): decoded UTF-8 text made of whole lines, about BLOCK_BYTES at a time.

    A missing, binary or non-UTF-8 file, or a line over MAX_LINE_BYTES, is a
    DataError that names the file and the line.  Only the last block of a
    file can lack a final line end.
    """
    path = require_file(path, what, DataError)
    limit = MAX_LINE_BYTES
    # Reading at most `limit` bytes at a time, only a block's first line (the one carried over from the
    # previous read) can be longer than the limit: that is the only line whose length needs checking.
    size = min(BLOCK_BYTES, limit)
    line = 1  # number of the first line of the pending bytes
    try:
        with open(path, "rb") as fh:
            pending = b""
            while True:
                chunk = fh.read(size)
                if not chunk:
                    break
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                first_len = pending.find(b"\n") + 1 if cut else len(pending)
                if first_len > limit:
                    raise DataError(f"{what} {path}: line {line} is longer than {limit >> 20} MiB; a corpus "
                                    f"needs line breaks (one sentence or paragraph per line)")
                if cut:
                    block, pending = pending[:cut], pending[cut:]
                    yield _decode(block, path, what, line), len(block)
                    line += block.count(b"\n")
            if pending:
                yield _decode(pending, path, what, line), len(pending)
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err.strerror}") from None


def _decode(block, path, what, first_line):
    """``block`` as text, or a DataError naming the line (and column) of a NUL or a byte that is not UTF-8."""
    nul = block.find(b"\x00")
    if nul >= 0:
        line = first_line + block.count(b"\n", 0, nul)
        raise DataError(f"{what} {path} looks binary (NUL byte on line {line}), not text")
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + block.count(b"\n", 0, err.start)
        column = err.start - block.rfind(b"\n", 0, err.start)
        raise DataError(f"{what} {path} is not UTF-8 text (bad byte on line {line}, column {column})") from None


def block_tokens(text, reading=Reading()):
    """Whitespace-separated tokens of whole lines, with ``<eos>`` at every line end (lmtrain/data/tokenize.py:
    byte-order marks removed, "\r\n" and a lone "\r" read as line ends).

    A last line without a line end still ends in ``<eos>``: a file is a
    sequence of lines, whether or not its last one is terminated.
    """
    return reading.tokens(text)


def file_tokens(path, what="corpus file", reading=Reading()):
    """Yield the tokens of a file, block by block (lists of strings)."""
    for text, _ in read_blocks(path, what):
        yield block_tokens(text, reading)


def read_tokens(path, what="corpus file", reading=Reading()):
    """All tokens of a file as one list (small files: a prompt file, a test fixture)."""
    return [t for block in file_tokens(path, what, reading) for t in block]


def encode_blocks(blocks, vocab, dtype):
    """Yield each block of tokens as an id array of ``dtype`` (words outside ``vocab`` become <unk>)."""
    get, unk = vocab.index.get, repeat(vocab.unk_id)
    for tokens in blocks:
        yield np.fromiter(map(get, tokens, unk), dtype=dtype, count=len(tokens))


def encode_file(path, vocab, what="text file"):
    """The ids of a whole file (as ``lmtrain eval --text`` reads it), without a list of its tokens."""
    dtype = id_dtype(len(vocab))
    parts = list(encode_blocks(file_tokens(path, what, vocab.reading), vocab, dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def id_dtype(vocab_size):
    """The smallest unsigned type that holds every id: uint16 up to 65,536 words, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class Corpus:
    """The vocabulary and each split as a 1-D id array (memory-mapped from a prepared cache, or in memory)."""
    vocab: Vocab
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def split(self, name):
        return getattr(self, name)

    def describe(self):
        """A line on the vocabulary and each split's tokens, with the share that became <unk>; and, when that
        share is high, a second line on how to lower it."""
        shares = {s: unk_share(self.split(s), self.vocab) for s in SPLITS}
        line = (f"vocabulary {len(self.vocab):,} words; tokens: "
                + ", ".join(f"{s} {len(self.split(s)):,} ({100 * shares[s]:.1f}% <unk>)" for s in SPLITS))
        worst = max(("valid", "test"), key=shares.get)
        return line + unk_advice(shares[worst], {"valid": "validation", "test": "test"}[worst], self.vocab)


UNK_HIGH = 0.05  # beyond this share of <unk> a word-level model is scored on <unk> more than on words


def unk_share(ids, vocab):
    """The share of ``ids`` that are <unk>."""
    return float(np.count_nonzero(np.asarray(ids) == vocab.unk_id)) / max(len(ids), 1)


def unk_advice(share, what, vocab=None):
    """A note when ``share`` of ``what`` is <unk>: its perplexity then says little about the words.  With the
    ``vocab``, the note leaves out the settings it already has."""
    if share <= UNK_HIGH:
        return ""
    ways = ["keep rarer words (a lower data.min_freq, a larger data.max_size)"]
    if vocab is None or vocab.reading.tokenizer != "words":
        ways.append("split punctuation from words (data.tokenizer: words)")
    if vocab is None or not vocab.lowercase:
        ways.append("fold case (data.lowercase: true)")
    return (f"\nnote: {100 * share:.1f}% of the {what} tokens are <unk> (words the vocabulary lacks); to lower it, "
            + ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1])


def check_has_tokens(split, name, has_words):
    if not has_words:
        raise DataError(f"the {split} split ({name}) has no tokens")


def build_corpus(split_tokens, min_freq=1, max_size=None, reading=Reading(), names=None):
    """A Corpus from token lists held in memory (the built-in stories): the vocabulary from the
    training tokens, then every split encoded."""
    names = names or {s: s for s in SPLITS}
    for split in SPLITS:
        check_has_tokens(split, names[split], any(t != EOS for t in split_tokens[split]))
    vocab = Vocab.build(Counter(split_tokens["train"]), min_freq=min_freq, max_size=max_size, reading=reading)
    dtype = id_dtype(len(vocab))
    return Corpus(vocab, *(next(encode_blocks([split_tokens[s]], vocab, dtype)) for s in SPLITS))
