"""Word <-> id mapping, built from the training split only."""
from collections import Counter

import numpy as np

from lmtrain.data.tokenize import EOS, UNK, Reading

__all__ = ["EOS", "UNK", "Vocab", "vocab_difference"]


class Vocab:
    """A fixed list of words; id i is ``words[i]``.

    ``<unk>`` and ``<eos>`` are always present.  Words outside the list encode
    as ``<unk>``.  How text was read (the tokenizer, normalisation and
    ``lowercase``: its ``reading``) is part of the vocabulary, because anything
    encoded later (a prompt, a user's file) must be read the same way.
    """

    def __init__(self, words, lowercase=False, tokenizer="whitespace", normalize=None):
        self.words = list(words)
        self.reading = Reading(tokenizer, bool(lowercase), normalize)
        self.lowercase = self.reading.lowercase
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary has repeated words")
        for special in (UNK, EOS):
            if special not in self.index:
                raise ValueError(f"vocabulary lacks {special}")
        self.unk_id = self.index[UNK]
        self.eos_id = self.index[EOS]

    @classmethod
    def build(cls, counts, min_freq=1, max_size=None, reading=Reading()):
        """Keep words seen at least ``min_freq`` times, most frequent first.

        Ties are broken by the word itself, so the same corpus always gives the
        same ids.  ``max_size`` counts the specials.
        """
        counts = Counter({w: c for w, c in counts.items() if w not in (UNK, EOS)})
        # alphabetical, then stably by falling count: the order of key (-count, word), several times faster
        # than sorting by that tuple at a large vocabulary's many tied counts
        ranked = sorted(sorted(w for w, c in counts.items() if c >= min_freq), key=counts.__getitem__, reverse=True)
        words = [EOS, UNK] + ranked
        if max_size is not None:
            words = words[:max_size]
        return cls(words, reading.lowercase, reading.tokenizer, reading.normalize)

    def __len__(self):
        return len(self.words)

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.words == other.words and self.reading == other.reading

    def normalize(self, token):
        return self.reading.token(token)

    def encode(self, tokens):
        index, unk = self.index, self.unk_id
        return np.fromiter((index.get(t, unk) for t in tokens), dtype=np.int32, count=len(tokens))

    def decode(self, ids):
        return [self.words[int(i)] for i in ids]

    def unknown(self, tokens):
        """The tokens (already normalised) that would encode as <unk>."""
        return [t for t in tokens if t not in self.index]

    def to_dict(self):
        r = self.reading
        return {"words": self.words, "lowercase": r.lowercase, "tokenizer": r.tokenizer, "normalize": r.normalize}

    @classmethod
    def from_dict(cls, d):
        return cls(d["words"], lowercase=d.get("lowercase", False), tokenizer=d.get("tokenizer", "whitespace"),
                   normalize=d.get("normalize"))


def vocab_difference(expected, actual):
    """How ``actual`` differs from ``expected`` in a few words ("" when they are the same)."""
    if expected == actual:
        return ""
    if expected.reading != actual.reading:
        return f"text read as {expected.reading} then, as {actual.reading} now"
    where = next((i for i, (a, b) in enumerate(zip(expected.words, actual.words)) if a != b), None)
    sizes = f"{len(expected):,} words then, {len(actual):,} now"
    if where is None:
        return sizes
    return f"{sizes}; word {where} was {expected.words[where]!r}, is {actual.words[where]!r}"
