"""The tokenizers (lmtrain/data/tokenize.py): ``whitespace`` reads text token for token as lmtrain read it before
``words`` existed, and ``words`` follows the documented rule.  Every expected token list is written out literally."""

import pytest

from lmtrain.data.tokenize import TOKENIZERS, tokenize
from lmtrain.data.vocab import EOS

E = EOS


def reference_block_tokens(text, lowercase=False):
    """``block_tokens`` of lmtrain.data.corpus as it was before the tokenizers, frozen here: the published
    PTB and WikiText token counts were made with it, and ``whitespace`` must keep giving its tokens."""
    if lowercase:
        text = text.lower()
    tokens = text.replace("\n", f" {EOS} ").split()
    if text and not text.endswith("\n"):
        tokens.append(EOS)
    return tokens


ORDINARY = [
    " a b \n c\n\nD \n",
    "no final newline",
    "the <unk> of 1,000 N dollars .\n\n\n",
    "tabs\tand  spaces\x0band\x0cfeeds\n",
    "Don't stop—it's 3.5% of U.S. sales!\n",
    "unicode: café naïve Москва 中文 👍\n",
    "",
    "\n",
    "   ",
]


@pytest.mark.parametrize("text", ORDINARY)
@pytest.mark.parametrize("lowercase", [False, True])
def test_whitespace_gives_todays_tokens(text, lowercase):
    assert tokenize(text, "whitespace", lowercase) == reference_block_tokens(text, lowercase)


def test_whitespace_is_the_default():
    assert tokenize(" a b \n c\n\nD \n", lowercase=True) == ["a", "b", E, "c", E, E, "d", E]


def test_whitespace_on_ptb_gives_todays_tokens(ptb):
    """The Penn Treebank's training split, token for token (skipped without LMTRAIN_PTB_DIR)."""
    text = (ptb / "train.txt").read_bytes().decode("utf-8")  # as the readers decode it: no newline translation
    tokens = tokenize(text)
    assert tokens == reference_block_tokens(text)
    assert len(tokens) == 929_589  # the published count, <eos> included


# Line ends, byte-order marks and empty text: the same for every tokenizer.
LINES = [
    ("", []),
    ("\n", [E]),
    ("   ", [E]),  # a line with no word is a blank line
    ("\n\n", [E, E]),
    ("one two", ["one", "two", E]),  # no final line end: the last line still ends in <eos>
    ("one\ntwo", ["one", E, "two", E]),
    ("one\r\ntwo\r\n", ["one", E, "two", E]),  # CRLF is one line end
    ("one\r\n\r\ntwo", ["one", E, E, "two", E]),
    ("one\rtwo\r", ["one", E, "two", E]),  # a lone CR (old Mac files) is a line end
    ("one\r\r\ntwo", ["one", E, E, "two", E]),  # CR then CRLF: two line ends, as Python's universal newlines
    ("\ufeffone two\n", ["one", "two", E]),  # a byte-order mark is dropped, not glued to the first word
    ("\ufeff", []),
    ("one\n\ufefftwo\ufeff\n", ["one", E, "two", E]),  # a second file's mark, mid-block
    ("one\u2028two\x85three\n", ["one", "two", "three", E]),  # other separators are whitespace
]


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("text, expected", LINES)
def test_line_ends_and_byte_order_marks(tokenizer, text, expected):
    assert tokenize(text, tokenizer) == expected


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_blocks_of_whole_lines_concatenate(tokenizer):
    """The readers tokenize a file block by block: whole lines at a time give the tokens of the whole."""
    lines = [
        "Call me Ishmael.\r\n",
        "\n",
        "Some years ago—never mind how long\n",
        "\ufeffprecisely—having\n",
        "little or no money in my purse",
    ]
    whole = tokenize("".join(lines), tokenizer)
    assert whole == [t for i in range(len(lines)) for t in tokenize(lines[i], tokenizer)]
    assert whole == tokenize("".join(lines[:2]), tokenizer) + tokenize("".join(lines[2:]), tokenizer)


def test_whitespace_keeps_punctuation_on_words():
    assert tokenize("Speak. speak, Speak\n") == ["Speak.", "speak,", "Speak", E]


WORDS = {
    "punctuation": (
        'He said, "Stop!" (twice); then: go?',
        ["He", "said", ",", '"', "Stop", "!", '"', "(", "twice", ")", ";", "then", ":", "go", "?", E],
    ),
    "case kept": ("Speak. speak, SPEAK", ["Speak", ".", "speak", ",", "SPEAK", E]),
    "apostrophes": (
        "don't o'clock rock 'n' roll 'tis sailors' hats",
        ["don't", "o'clock", "rock", "'", "n", "'", "roll", "'", "tis", "sailors", "'", "hats", E],
    ),
    "curly apostrophes": (
        "don’t people’s ’tis sailors’ ‘quoted’ 1990’s",
        ["don't", "people's", "’", "tis", "sailors", "’", "‘", "quoted", "’", "1990's", E],
    ),
    "numbers": (
        "3.5 1,000 1,000,000.25 2.0.1 10:30 1st 3.5. 5,",
        ["3.5", "1,000", "1,000,000.25", "2.0.1", "10", ":", "30", "1st", "3.5", ".", "5", ",", E],
    ),
    "signs and percent": (
        "-5 +3.5 −2 (-1) x=-4 3-5 x-5 50% -3.5% $4.50 €10",
        [
            "-5",
            "+3.5",
            "−2",
            "(",
            "-1",
            ")",
            "x",
            "=",
            "-4",
            "3",
            "-",
            "5",
            "x",
            "-",
            "5",
            "50",
            "%",
            "-3.5",
            "%",
            "$",
            "4.50",
            "€",
            "10",
            E,
        ],
    ),
    "hyphens and dashes": (
        "sea-captain mother-in-law well--known stop—now a – b ——",
        [
            "sea",
            "-",
            "captain",
            "mother",
            "-",
            "in",
            "-",
            "law",
            "well",
            "--",
            "known",
            "stop",
            "—",
            "now",
            "a",
            "–",
            "b",
            "—",
            "—",
            E,
        ],
    ),
    "ellipses": (
        "wait... what.. so… ok!!! ?!",
        ["wait", "...", "what", "..", "so", "…", "ok", "!", "!", "!", "?", "!", E],
    ),
    "abbreviations": ("Mr. Smith, U.S.A.", ["Mr", ".", "Smith", ",", "U", ".", "S", ".", "A", ".", E]),
    "urls": (
        "see https://example.com/a?b=1&c=d. or (www.python.org/doc), HTTP://X.ORG/A_B!",
        [
            "see",
            "https://example.com/a?b=1&c=d",
            ".",
            "or",
            "(",
            "www.python.org/doc",
            ")",
            ",",
            "HTTP://X.ORG/A_B",
            "!",
            E,
        ],
    ),
    "no url without a scheme or www": ("example.com/x", ["example", ".", "com", "/", "x", E]),
    "e-mail": (
        "mail john.smith+x@mail.example.co.uk. or root@localhost",
        ["mail", "john.smith+x@mail.example.co.uk", ".", "or", "root", "@", "localhost", E],
    ),
    "underscores": (
        "snake_case _italic_ __init__",
        ["snake", "_", "case", "_", "italic", "_", "_", "_", "init", "_", "_", E],
    ),
    "lmtrain's own tokens": ("a <unk> b <eos> <x>", ["a", "<unk>", "b", E, "<", "x", ">", E]),
    "symbols": ("a+b=c & d/e #1 @me ©", ["a", "+", "b", "=", "c", "&", "d", "/", "e", "#", "1", "@", "me", "©", E]),
    "cyrillic": (
        "Москва — столица России. Ну-ка, 2,5 млн!",
        ["Москва", "—", "столица", "России", ".", "Ну", "-", "ка", ",", "2,5", "млн", "!", E],
    ),
    "ukrainian apostrophe": ("м’ясо пір'я", ["м'ясо", "пір'я", E]),
    "greek": ("Καλημέρα, κόσμε! Τι κάνεις;", ["Καλημέρα", ",", "κόσμε", "!", "Τι", "κάνεις", ";", E]),
    "arabic": (
        "مرحبا بالعالم؟ هذا اختبار، مُحَمَّد ١٢٣",
        ["مرحبا", "بالعالم", "؟", "هذا", "اختبار", "،", "مُحَمَّد", "١٢٣", E],
    ),
    "hebrew": ("שלום, עולם! צה״ל", ["שלום", ",", "עולם", "!", "צה״ל", E]),
    "persian zero-width non-joiner": ("می‌خواهم بروم.", ["می\u200cخواهم", "بروم", ".", E]),
    "devanagari": ("हिन्दी भाषा। नमस्ते, दुनिया!", ["हिन्दी", "भाषा", "।", "नमस्ते", ",", "दुनिया", "!", E]),
    "chinese": (
        "中文没有空格。我爱Python！",
        ["中", "文", "没", "有", "空", "格", "。", "我", "爱", "Python", "！", E],
    ),
    "japanese": (
        "日本語のテキスト、カタカナ。",
        ["日", "本", "語", "の", "テ", "キ", "ス", "ト", "、", "カ", "タ", "カ", "ナ", "。", E],
    ),
    "korean": ("한국어 문장입니다.", ["한국어", "문장입니다", ".", E]),
    "thai": ("ภาษาไทย ไม่มีช่องว่าง", ["ภาษาไทย", "ไม่มีช่องว่าง", E]),  # runs between spaces, unsegmented
    "combining marks": ("e\u0301te\u0301 (decomposed)", ["e\u0301te\u0301", "(", "decomposed", ")", E]),
    "emoji": (
        "ok👍🏽 👨‍👩‍👧 🇫🇷🇩🇪 ❤️ 1️⃣ 😂😂",
        ["ok", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🇩🇪", "❤\ufe0f", "1\ufe0f\u20e3", "😂", "😂", E],
    ),
    "invisible characters": ("co\u00adoperate a\u200bb \u200eleft\u200f", ["cooperate", "a", "b", "left", E]),
    "line ends": ("First line.\r\n\r\nLast line", ["First", "line", ".", E, E, "Last", "line", E]),
}


@pytest.mark.parametrize("text, expected", WORDS.values(), ids=WORDS.keys())
def test_words_rule(text, expected):
    assert tokenize(text, "words") == expected


def test_words_lowercase():
    assert tokenize("Speak. speak, SPEAK\nÉTÉ Москва", "words", lowercase=True) == [
        "speak",
        ".",
        "speak",
        ",",
        "speak",
        E,
        "été",
        "москва",
        E,
    ]


def test_normalize():
    decomposed = "e\u0301te\u0301"
    assert tokenize(decomposed, "words", normalize="NFC") == ["\u00e9t\u00e9", E]
    assert tokenize("ﬁne ＡＢＣ１２３ wait… x²", "words", normalize="NFKC") == [
        "fine",
        "ABC123",
        "wait",
        "...",
        "x2",
        E,
    ]
    assert tokenize("ﬁne Ⅻ", "whitespace", lowercase=True, normalize="NFKC") == ["fine", "xii", E]
    assert tokenize(decomposed, "words") == [decomposed, E]  # no normalization unless asked


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="unknown tokenizer 'spaces'"):
        tokenize("a", "spaces")
    with pytest.raises(ValueError, match="unknown normalize 'NFD'"):
        tokenize("a", "words", normalize="NFD")


def test_words_beyond_the_basic_plane():
    assert tokenize("𐌰𐌹𐌽𐍃 𝐀𝐁 𠀋𠀌", "words") == ["𐌰𐌹𐌽𐍃", "𝐀𝐁", "𠀋", "𠀌", E]


def test_blocks_without_links_may_skip_the_link_rules():
    """A block without "@", "://" or "www." is read without the URL and e-mail alternatives (for speed): on
    text that has no link, both patterns give the same tokens."""
    from lmtrain.data.tokenize import patterns

    with_links, plain = patterns()
    for text, _ in WORDS.values():
        if not any(hint in text for hint in ("@", "://", "www.", "WWW.")):
            assert with_links.findall(text) == plain.findall(text), text


def test_long_runs_take_linear_time():
    """Many places where an address or a number might start, in one run without spaces: each is looked at a
    bounded number of times (a run of 200,000 characters takes well under a second, not minutes)."""
    import time

    start = time.process_time()
    assert tokenize("@ " + "a." * 100_000, "words")[:4] == ["@", "a", ".", "a"]
    assert tokenize("1," * 100_000 + "\n" + "." * 200_000, "words") == ["1," * 99_999 + "1", ",", E, "." * 200_000, E]
    assert time.process_time() - start < 10
