"""A generated corpus the size of WikiText-103, to measure lmtrain on large data without downloading it.

    python benchmarks/zipf_corpus.py data/zipf                    # 100M training tokens, 267,735 word types
    python benchmarks/zipf_corpus.py data/zipf-small --tokens 1000000 --seed 1

Writes OUT/train.txt, OUT/valid.txt and OUT/test.txt.  Word i (0 = the most
frequent) is drawn with probability proportional to 1 / (i + 1)^exponent over
--types words, as in natural text (Zipf's law); words are letter strings,
shorter for frequent ones ("a", "b", ..., "aa", ...).  Lines hold 1 + Poisson(23)
words, 24 on average, about a sentence.  --tokens counts the training split as lmtrain does:
its words plus one <eos> per line; validation and test get --tokens / 400 each
(WikiText-103's proportion).

The text is generated and written a chunk of lines at a time (numpy draws the
words and line lengths, one join builds the chunk's text), so memory stays
flat whatever --tokens is.  The same --seed and --tokens always give the same
files.
"""

import argparse
import os
import sys
import time

import numpy as np

WIKITEXT103_TYPES = 267735
CHUNK_TOKENS = 1 << 20  # a constant: changing it would change the files a seed gives
MEAN_WORDS_PER_LINE = 24


def word_strings(n):
    """Distinct lowercase words, shortest first: bijective base 26 ("a".."z", "aa".."zz", "aaa", ...)."""
    words, length = [], 1
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    while len(words) < n:
        count = min(26**length, n - len(words))
        digits = (np.arange(count)[:, None] // 26 ** np.arange(length - 1, -1, -1)[None, :]) % 26
        words.extend("".join(row) for row in letters[digits])
        length += 1
    return np.array(words, dtype=object)


def zipf_cdf(types, exponent):
    weights = 1.0 / np.arange(1, types + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def write_split(path, tokens, words, cdf, rng):
    """Write lines of Zipf-drawn words to ``path`` until they count ``tokens`` tokens (words + one <eos> per
    line); returns (lines, bytes)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    left, lines, size = tokens, 0, 0
    with open(tmp, "w", encoding="ascii", newline="\n") as fh:
        while left > 0:
            # lines of 1 + Poisson words, each line costing its words and one <eos>
            lengths = 1 + rng.poisson(MEAN_WORDS_PER_LINE - 1, size=CHUNK_TOKENS // MEAN_WORDS_PER_LINE + 1)
            ends = np.cumsum(lengths + 1)
            n_lines = min(int(np.searchsorted(ends, left, side="left")) + 1, len(lengths))
            lengths = lengths[:n_lines]
            if ends[n_lines - 1] > left:  # the last line of the split: only what is left (a blank line is 1 token)
                lengths[-1] = left - (ends[n_lines - 2] if n_lines > 1 else 0) - 1
            ids = np.searchsorted(cdf, rng.random(int(lengths.sum())), side="right")
            parts = np.empty(2 * len(ids), dtype=object)
            parts[0::2] = words[ids]
            parts[1::2] = " "
            parts[2 * np.cumsum(lengths)[lengths > 0] - 1] = "\n"  # after a line's last word
            text = "".join(parts)
            blank = np.flatnonzero(lengths == 0)
            if len(blank):  # only the very last line can be blank
                text += "\n"
            fh.write(text)
            left -= int(lengths.sum()) + n_lines
            lines += n_lines
            size += len(text)
    os.replace(tmp, path)
    return lines, size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write train.txt, valid.txt and test.txt into")
    ap.add_argument("--tokens", type=int, default=100_000_000, help="training tokens, <eos> included")
    ap.add_argument("--types", type=int, default=WIKITEXT103_TYPES, help="word types to draw from")
    ap.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tokens < 400 or args.types < 1 or args.exponent <= 0:
        ap.error("need --tokens >= 400, --types >= 1 and --exponent > 0")
    os.makedirs(args.out, exist_ok=True)
    words, cdf = word_strings(args.types), zipf_cdf(args.types, args.exponent)
    start = time.perf_counter()
    sizes = {"train": args.tokens, "valid": args.tokens // 400, "test": args.tokens // 400}
    for i, (split, tokens) in enumerate(sizes.items()):
        rng = np.random.default_rng([args.seed, i])
        path = os.path.join(args.out, f"{split}.txt")
        lines, size = write_split(path, tokens, words, cdf, rng)
        print(
            f"{path}: {tokens:,} tokens in {lines:,} lines, {size / 2**20:,.1f} MiB "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print(
        "prepare it with: lmtrain prepare CONFIG --set data.source=text "
        + " ".join(f"--set data.{s}={os.path.join(args.out, s + '.txt')}" for s in sizes)
    )


if __name__ == "__main__":
    sys.exit(main())
