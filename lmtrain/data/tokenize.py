"""Splitting text into tokens: ``whitespace`` (the Penn Treebank's and WikiText's format) and ``words``.

The readers call :func:`tokenize` once per block of whole lines (see ``read_blocks``).  Every tokenizer
turns each line end into ``<eos>``, a blank line included, and a last line without a line end still gets
its ``<eos>``: a file is a sequence of lines, whether or not its last one is terminated.

Both tokenizers first remove byte-order marks (U+FEFF, wherever they are: a file's first one sticks to its
first word otherwise, and concatenated files carry more) and read line ends as Python's universal newlines
do: "\\r\\n", "\\n" and a lone "\\r" (old Mac files) are each one line end.  Other separators (U+2028, form
feed, ...) are whitespace, as ``read_blocks`` never breaks a block at them.

- ``whitespace``: tokens are the runs of characters between whitespace (``str.split``), the format lmtrain
  has always read (``block_tokens``): the published PTB and WikiText token counts depend on it, and for text
  without byte-order marks or lone "\\r" (a "\\r\\n" included) it gives the same tokens as ever.
- ``words``: punctuation is split from words, in any script.  The rule, with examples, is in the user
  documentation ("Tokenizers: what is one token").  It is one compiled regular expression, applied with
  ``findall`` to the whole block.

Neither tokenizer loops over characters or tokens in Python: 100M-token corpora (WikiText-103) must not
wait on the tokenizer.
"""
import functools
import itertools
import re
import unicodedata

from dataclasses import dataclass
from typing import Optional

UNK = "<unk>"
EOS = "<eos>"
TOKENIZERS = ("whitespace", "words")
NORMALIZATIONS = (None, "NFC", "NFKC")

BOM = "\ufeff"
APOSTROPHE = "'"
CURLY_APOSTROPHE = "\u2019"  # right single quotation mark, the typographic apostrophe
SOFT_HYPHEN = "\u00ad"


def tokenize(text, tokenizer="whitespace", lowercase=False, normalize=None):
    """The tokens of ``text`` (whole lines), with ``<eos>`` at every line end.

    ``normalize`` (None, "NFC" or "NFKC") is applied before ``lowercase``, so that, say, NFKC's "Ⅻ" -> "XII"
    is lowercased too.  Raises ValueError for an unknown ``tokenizer`` or ``normalize``.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}: choose None, NFC or NFKC")
    # Each step costs one C-speed scan, and the first two only on text that needs them.
    if BOM in text:
        text = text.replace(BOM, "")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if normalize:
        text = unicodedata.normalize(normalize, text)
    if lowercase:
        text = text.lower()
    if tokenizer == "whitespace":
        tokens = text.replace("\n", f" {EOS} ").split()
    else:
        tokens = _words(text)
    if text and not text.endswith("\n"):
        tokens.append(EOS)
    return tokens


@dataclass(frozen=True)
class Reading:
    """How text becomes tokens (data.tokenizer, data.normalize, data.lowercase).  It belongs to a vocabulary:
    a model's prompts, scored text and evaluated files are read the way its training text was."""

    tokenizer: str = "whitespace"
    lowercase: bool = False
    normalize: Optional[str] = None

    def tokens(self, text):
        """The tokens of whole lines of text, ``<eos>`` at every line end (``tokenize``)."""
        return tokenize(text, self.tokenizer, self.lowercase, self.normalize)

    def words(self, text):
        """The tokens of a text that is not a file's lines (a prompt, a sentence): without the ``<eos>`` its
        end gets; a line break inside it is still an ``<eos>``."""
        tokens = self.tokens(text.rstrip("\r\n"))
        return tokens[:-1] if tokens and tokens[-1] == EOS else tokens

    def token(self, token):
        """One token as the vocabulary holds it (normalised, lowercased)."""
        if self.normalize:
            token = unicodedata.normalize(self.normalize, token)
        return token.lower() if self.lowercase else token


def _words(text):
    """The ``words`` tokens of cleaned text (line ends "\\n" only), ``<eos>`` for each line end."""
    # The pattern keeps "<eos>" whole, so line ends become that token the way ``whitespace`` makes them.
    text = text.replace("\n", f" {EOS} ")
    if SOFT_HYPHEN in text:  # an invisible "may break here" inside a word: the word is whole without it
        text = text.replace(SOFT_HYPHEN, "")
    if CURLY_APOSTROPHE in text:  # don’t -> don't, before splitting (the search jumps from one ’ to the next)
        text = _apostrophes().sub(APOSTROPHE, text)
    with_links, plain = patterns()
    # The URL and e-mail alternatives cost a second look at every word they fail on; a block without "@",
    # "://" and "www." (most blocks) holds no link, and the pattern without them gives the same tokens.
    if "@" in text or "://" in text or "www." in text or "WWW." in text:
        return with_links.findall(text)
    return plain.findall(text)


# Han ideographs, kana and bopomofo, with the iteration and length marks ("々", "ー"): Chinese and Japanese are
# written without spaces, and a regular expression cannot tell where their words end: each is one token.
CJK = ("\u3005-\u3007\u3021-\u3029\u3031-\u3035\u3038-\u303c\u3040-\u30ff\u3100-\u312f\u31a0-\u31bf"
       "\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U0001b000-\U0001b16f"
       "\U00020000-\U000323af")

# Characters the scan below covers: planes 2 and 3 hold CJK ideographs only (part of CJK above), planes 4-13
# nothing, 15-16 private use; plane 14 holds the tags and the variation selectors.
_SCANNED = (range(0x20000), range(0xE0000, 0xE1000))


def _ranges(codepoints):
    """A character-class body ("a-z...") for a sorted list of code points."""
    parts = []
    for _, run in itertools.groupby(enumerate(codepoints), lambda pair: pair[1] - pair[0]):
        run = [cp for _, cp in run]
        first, last = re.escape(chr(run[0])), re.escape(chr(run[-1]))
        parts.append(first if len(run) == 1 else f"{first}-{last}")
    return "".join(parts)


@functools.cache
def _classes():
    """Character-class bodies ("a-z..."), from this Python's Unicode database: a dict of

    - ``word``: letters and digits of the Basic Multilingual Plane, less CJK (and so less "_");
    - ``word_or_mark``: the same with the combining marks and the zero-width (non-)joiners, which belong
      inside a word (Devanagari "ि", Arabic vowel signs, a decomposed "é"'s accent, Persian "می‌خواهم");
    - ``mark``: the marks, those of the supplementary planes only where Han uses them (variation selectors);
    - ``astral_word``: letters and digits of the supplementary planes; ``astral_word_or_mark``: all letters,
      digits, marks and joiners, which may follow them;
    - ``sep``: control and invisible format characters, never a token of their own.

    Python's ``\\w`` would do for letters and digits, but it has no marks, so it cuts words of many scripts
    apart, and it has "_" and CJK.  The supplementary planes get classes of their own because Python's ``re``
    checks their ranges one by one after a table for the rest: in the classes tried at every character,
    they made ``words`` five times slower.  Building the classes and patterns takes about 0.1 s, once per
    process, when ``words`` is first used.
    """
    cjk = set()
    for first, last in re.findall(r"(.)(?:-(.))?", CJK, flags=re.DOTALL):
        cjk.update(range(ord(first), ord(last or first) + 1))
    word, mark, sep = [], [], []
    for cp in itertools.chain(*_SCANNED):
        cat = unicodedata.category(chr(cp))
        if cat[0] in "LN" and cp not in cjk:
            word.append(cp)
        elif cat[0] == "M":
            mark.append(cp)
        elif cat in ("Cc", "Cf"):
            sep.append(cp)
    bmp = 0x10000
    joiners = [0x200C, 0x200D]
    return {"word": _ranges([c for c in word if c < bmp]),
            "word_or_mark": _ranges(sorted([c for c in word + mark if c < bmp] + joiners)),
            "mark": _ranges([c for c in mark if c < bmp or 0xE0100 <= c <= 0xE01EF]),
            "astral_word": _ranges([c for c in word if c >= bmp]),
            "astral_word_or_mark": _ranges(sorted(word + mark + joiners)),
            "sep": r"\s" + _ranges(sep)}  # \s first: it is checked first


@functools.cache
def patterns():
    """The compiled ``words`` expressions: (with URL and e-mail alternatives, without them)."""
    c = _classes()
    tail = f"[{c['word_or_mark']}]*"
    # What joins the parts of a word: an apostrophe (don't, o'clock; "’" was turned into "'" already), Hebrew
    # geresh or gershayim (צה״ל) or the Catalan middle dot (col·lecció) between letters, and "." or ","
    # between digits (3.5, 1,000, 2.0.1).
    joined = f"(?:['\u05f3\u05f4\u00b7][{c['word']}]{tail}|(?<=\\d)[.,]\\d{tail})*"
    alternatives = [
        "<(?:eos|unk)>",  # lmtrain's own tokens (line ends among them), kept whole
        f"[{c['word']}]{tail}{joined}",  # a word: letters, digits and their marks
        f"(?<!\\w)[-+\u2212]\\d{tail}{joined}",  # a signed number: -5, +3.5, −2 (but 3-5 is 3 - 5)
        f"[{CJK}][{c['mark']}]*",  # one Han, kana or bopomofo character
        r"\.+|-+",  # an ellipsis "...", a dash "--": a run is one token
        # a word of a script beyond the BMP (Gothic 𐌰𐌹𐌽𐍃); the lookahead, a single range, spares every other
        # character the check of each range of the class
        f"(?=[\U00010000-\U0010ffff])[{c['astral_word']}][{c['astral_word_or_mark']}]*",
        "[\U0001f1e6-\U0001f1ff]{2}",  # a flag: two regional indicators
        # any other character: punctuation, a symbol, an emoji with its modifiers (skin tone, variation
        # selector, tags) and the emoji it is joined to by a zero-width joiner (👨‍👩‍👧 is one token)
        f"[^{c['sep']}](?:[{c['mark']}\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f]|\u200d[^{c['sep']}])*",
    ]
    # a URL runs to the next whitespace (or non-ASCII character), less the punctuation that ends it
    url = r"(?:(?i:https?|ftp)://|www\.|WWW\.)[!#-;=?-~]*[^\x00-\x20\x7f-\U0010ffff\"<>.,;:!?')\]}]"
    # An address's parts have at most 64 characters: bounds that also keep a long run like "a.b.c.d..." (each
    # letter a place where an address might start) from being scanned to its end from every one of them.
    email = f"[{c['word']}][\\w.+-]{{0,63}}@[{c['word']}][\\w-]{{0,62}}(?:\\.[\\w-]{{1,63}})+"
    plain = re.compile("|".join(alternatives))
    # findall takes the first alternative that matches, not the longest: links go before words.
    with_links = re.compile("|".join(alternatives[:1] + [url, email] + alternatives[1:]))
    return with_links, plain


@functools.cache
def _apostrophes():
    """A curly apostrophe between the letters (or digits) of a word, where the word rule joins it."""
    c = _classes()
    # the literal first: the search then looks for "’" alone, and checks its neighbours only there
    return re.compile(f"{CURLY_APOSTROPHE}(?<=[{c['word_or_mark']}]{CURLY_APOSTROPHE})(?=[{c['word']}])")
