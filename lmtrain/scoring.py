"""Scoring text: the log-probability of each line (a sentence) and of each word in it.

Every line is read the way the model's training text was (its vocabulary's reading) and ends with the
``<eos>`` training puts after every line, which is scored and counted too; a word outside the vocabulary
is scored as ``<unk>`` and reported.

- ``independent`` (rescoring n-best lists): every line from a zero state after an ``<eos>``, as
  generation reads a prompt.  Lines are scored many at a time: sorted by length, laid out as the columns
  of one batch, padded, the padding weighted 0, read in windows with the state carried (so a line of any
  length costs bounded memory).  Each line's score is the one it gets alone.
- ``stream``: the lines one after another, the state carried from each to the next, as in training and
  `lmtrain eval --text` (at batch 1).
"""

import math

import numpy as np

from lmtrain.backend import to_numpy
from lmtrain.errors import DataError
from lmtrain.evaluation import stream

ROWS = 4096  # tokens of a batch one window reads at most (the softmax's (rows, V) array is the largest)


def encode_lines(lines, vocab):
    """[(words, ids, unknown words)] of each line, read as the vocabulary says; ``ids`` end with <eos>."""
    out = []
    for line in lines:
        words = vocab.reading.words(line)
        ids = vocab.encode(words + ["<eos>"])
        out.append((words, ids, sorted({w for w, i in zip(words, ids) if i == vocab.unk_id})))
    return out


def score_independent(model, encoded, eos_id, batch_size=64):
    """Per line, the natural-log probability of each of its tokens, every line from a zero state."""
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k][1]))
    logp = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(len(encoded[k][1]) for k in batch)
        data = np.full((longest + 1, len(batch)), eos_id, np.int64)  # row 0: the <eos> a line follows
        weights = np.zeros((longest, len(batch)), np.float32)
        for b, k in enumerate(batch):
            ids = encoded[k][1]
            data[1 : len(ids) + 1, b] = ids
            weights[: len(ids), b] = 1.0
        nll = _row_nll(model, data, weights, max(1, ROWS // len(batch)))
        for b, k in enumerate(batch):
            logp[k] = -nll[: len(encoded[k][1]), b]
    return logp


def score_stream(model, encoded, eos_id, window):
    """Per line, the natural-log probability of each of its tokens, the state carried from line to line (the
    first line after an <eos>, as every other line is)."""
    ids = np.concatenate([[eos_id], *(e[1] for e in encoded)]).astype(np.int64)
    nll = _row_nll(model, ids[:, None], None, window)[:, 0]
    ends = np.cumsum([len(e[1]) for e in encoded])
    return [-part for part in np.split(nll, ends[:-1])]


def _row_nll(model, data, weights, window):
    """(rows - 1, B) -log p of each target of the layout ``data``, read in windows with the state carried."""
    parts = []
    stream(
        model,
        data,
        window,
        weights,
        on_window=lambda w: parts.append(to_numpy(model.row_nll()).astype(np.float64).reshape(len(w.y), -1)),
    )
    return np.concatenate(parts)


def summary(scored):
    """(lines, tokens, natural-log probability, <unk> tokens) of every scored line."""
    tokens = sum(len(s["logp"]) for s in scored)
    return len(scored), tokens, float(sum(np.sum(s["logp"]) for s in scored)), sum(s["unk"] for s in scored)


def score(model, vocab, lines, mode="independent", batch_size=64, window=35):
    """[{"text", "words", "logp" (natural log, per token with the <eos>), "unknown", "unk"}] per line."""
    if not lines:
        raise DataError("no lines to score: the input is empty")
    encoded = encode_lines(lines, vocab)
    if mode == "independent":
        logp = score_independent(model, encoded, vocab.eos_id, batch_size)
    else:
        logp = score_stream(model, encoded, vocab.eos_id, window)
    return [
        {
            "text": line,
            "words": words + ["<eos>"],
            "logp": lp,
            "unknown": unknown,
            "unk": int(np.count_nonzero(ids == vocab.unk_id)),
        }
        for line, (words, ids, unknown), lp in zip(lines, encoded, logp)
    ]


def in_base(logp, base):
    """A natural-log probability in ``base`` ("e", "10" or "2")."""
    return logp if base == "e" else logp / math.log(float(base))
