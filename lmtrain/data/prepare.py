"""Preparing a text corpus once: token ids on disk, memory-mapped by every later run.

Two passes over the files, each reading blocks of whole lines:

1. count: the words of the training split, and the tokens of every split;
2. encode: each block's ids are appended to the split's ``.npy`` file, whose
   header already holds the length pass 1 counted.

Neither pass holds more than one block of text as Python strings, so memory
stays flat whatever the corpus size (the vocabulary's counts aside).

The result is a directory under the cache root, named by a key made of the
format version, the vocabulary settings and the SHA-256 of every input file
(in order): ``train.npy``, ``valid.npy``, ``test.npy`` (uint16 ids when the
vocabulary has at most 65,536 words, else uint32), ``vocab.json`` and
``meta.json``.  It is written into a temporary directory that is renamed into
place when complete, so a prepare that is killed leaves no directory that a
later run could take for a finished one.  Runs open the arrays with
``numpy.load(..., mmap_mode="r")``: a later ``fit`` starts without
tokenising, and the operating system shares the pages between processes.
"""
import glob
import hashlib
import json
import os
import shutil
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from lmtrain.data.corpus import SPLITS, Corpus, block_tokens, check_has_tokens, encode_blocks, id_dtype, read_blocks
from lmtrain.data.download import sha256_file
from lmtrain.data.tokenize import Reading
from lmtrain.data.vocab import EOS, Vocab
from lmtrain.errors import DataError, require_file

# Bump when the files or their meaning change: the key changes with it, so an older cache is never read.
# Version 1 was a single data/cache/corpus-<key>.npz, which this code never opens; version 2 had no checksums.
FORMAT_VERSION = 3
PROGRESS_BYTES = 32 << 20  # inputs at least this large get a progress bar
HASH_IDS = 1 << 24  # ids hashed at a time when a prepared corpus is opened


def reading_of(reading):
    """The reading's settings as the key and meta.json record them."""
    return {"tokenizer": reading.tokenizer, "lowercase": reading.lowercase, "normalize": reading.normalize}


def cache_key(files, min_freq, max_size, reading):
    """The content key of a prepared corpus: ``files`` is {split: [path, ...]}."""
    sums = {s: [sha256_file(require_file(p, f"{s} file", DataError)) for p in files[s]] for s in SPLITS}
    text = json.dumps({"format": FORMAT_VERSION, "min_freq": min_freq, "max_size": max_size,
                       **reading_of(reading), "files": sums}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_dir_for(cache_root, key):
    return os.path.join(cache_root, f"tokens-{key[:24]}")


def prepare_corpus(files, cache_root, min_freq=1, max_size=None, reading=Reading(), log=print):
    """The Corpus of ``files`` ({split: [path, ...]}), memory-mapped from its cache, preparing it first
    when the cache lacks it or holds an unreadable copy."""
    key = cache_key(files, min_freq, max_size, reading)
    final = cache_dir_for(cache_root, key)
    if os.path.isdir(final):
        try:
            corpus = open_prepared(final, key)
            log(f"prepared corpus: {final}")
            return corpus
        except DataError as err:
            log(f"{err}; preparing it again")
    _remove_stale(cache_root, key)
    tmp = os.path.join(cache_root, f".tmp-{key[:24]}-{os.getpid()}")
    try:
        os.makedirs(tmp)
    except OSError as err:
        raise DataError(f"cannot create the corpus cache {tmp}: {err.strerror}") from None
    try:
        write_prepared(tmp, files, key, min_freq, max_size, reading, log)
        _move_into_place(tmp, final)
    except OSError as err:  # the inputs' read errors are DataErrors already: this is the cache's disk
        raise DataError(f"cannot write the corpus cache {tmp}: {err.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared corpus written to {final}")
    old = glob.glob(os.path.join(cache_root, "corpus-*.npz"))
    if old:
        log(f"note: {len(old)} cache file(s) of an older lmtrain ({cache_root}/corpus-*.npz) are no longer "
            f"read; they can be deleted")
    return open_prepared(final, key)


def write_prepared(out, files, key, min_freq, max_size, reading, log=print):
    """Tokenise ``files`` into the directory ``out`` (the two passes); returns the meta dict written."""
    total_bytes = sum(os.path.getsize(p) for s in SPLITS for p in files[s])
    start = time.perf_counter()
    with tqdm(total=2 * total_bytes, unit="B", unit_scale=True, desc="prepare", leave=False,
              dynamic_ncols=True, disable=True if total_bytes < PROGRESS_BYTES else None) as bar:
        counts, n_tokens = Counter(), {}
        for split in SPLITS:  # pass 1: count
            n, has_words = 0, False
            for tokens in _blocks(files[split], split, reading, bar):
                n += len(tokens)
                has_words = has_words or tokens.count(EOS) < len(tokens)
                if split == "train":
                    counts.update(tokens)
            named = files[split][:3] + ([f"{len(files[split]) - 3} more"] if len(files[split]) > 3 else [])
            check_has_tokens(split, ", ".join(named), has_words)
            n_tokens[split] = n
        vocab = Vocab.build(counts, min_freq=min_freq, max_size=max_size, reading=reading)
        del counts
        dtype = id_dtype(len(vocab))
        checks = {split: _write_ids(os.path.join(out, f"{split}.npy"), split, files[split], vocab, dtype,
                                    n_tokens[split], reading, bar) for split in SPLITS}  # pass 2: encode
    seconds = time.perf_counter() - start
    total = sum(n_tokens.values())
    log(f"tokenised {total:,} tokens ({', '.join(f'{s} {n_tokens[s]:,}' for s in SPLITS)}; vocabulary "
        f"{len(vocab):,} words, ids {dtype.name}) in {seconds:.1f} s: {total / max(seconds, 1e-9):,.0f} tokens/s")
    meta = {"format": FORMAT_VERSION, "key": key, "dtype": dtype.name, "vocab_size": len(vocab),
            "tokens": n_tokens, "min_freq": min_freq, "max_size": max_size, **reading_of(reading),
            "files": {s: [os.path.abspath(p) for p in files[s]] for s in SPLITS}, "seconds": round(seconds, 3),
            "checks": checks}
    text = json.dumps(vocab.to_dict(), ensure_ascii=False).encode()
    meta["vocab_sha256"] = hashlib.sha256(text).hexdigest()
    with open(os.path.join(out, "vocab.json"), "wb") as fh:
        fh.write(text)
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as fh:  # last: it marks a whole directory
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return meta


def _blocks(paths, split, reading, bar):
    for path in paths:
        for text, nbytes in read_blocks(path, f"{split} file"):
            bar.update(nbytes)
            yield block_tokens(text, reading)


def _write_ids(path, split, paths, vocab, dtype, n, reading, bar):
    """Stream the ids of ``paths`` into an .npy file of ``n`` ids of ``dtype``; returns what verifies them
    when they are read back: the SHA-256 of the ids' bytes and the largest id."""
    digest, largest = hashlib.sha256(), -1
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
        written = 0
        for ids in encode_blocks(_blocks(paths, split, reading, bar), vocab, dtype):
            written += len(ids)
            if written > n:
                break
            data = ids.tobytes()
            digest.update(data)
            fh.write(data)
            largest = max(largest, int(ids.max())) if len(ids) else largest
        fh.flush()
        os.fsync(fh.fileno())
    if written != n:
        raise DataError(f"the {split} files changed while they were being prepared ({', '.join(paths)}); "
                        f"run again once they are complete")
    return {"sha256": digest.hexdigest(), "max_id": largest}


def open_prepared(directory, key=None):
    """The Corpus in a prepared directory, its arrays memory-mapped; a DataError if it is not a complete
    prepared corpus of this format (and of ``key``, when given) exactly as it was written.

    Every open checks: meta.json's format and key; vocab.json's SHA-256 (a swapped word or a flipped
    ``lowercase``); each array's header, shape and type; the SHA-256 of each array's ids (a flipped byte; one
    pass over the mapped ids, under a second for 100M tokens) and that its largest id, recorded when it was
    written, names a word of the vocabulary."""
    try:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or (key is not None
                                                                                   and meta.get("key") != key):
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else '?'}, not {FORMAT_VERSION}")
        with open(os.path.join(directory, "vocab.json"), "rb") as fh:
            text = fh.read()
        if hashlib.sha256(text).hexdigest() != meta["vocab_sha256"]:
            raise ValueError("vocab.json is not the vocabulary it was written with")
        vocab = Vocab.from_dict(json.loads(text))
        if len(vocab) != meta["vocab_size"]:
            raise ValueError("vocab.json does not match meta.json")
        arrays = {split: _open_ids(directory, split, meta, len(vocab)) for split in SPLITS}
    except Exception as err:  # any failure to read it back (numpy's header parser raises SyntaxError too)
        raise DataError(f"the prepared corpus {directory} is incomplete or damaged "
                        f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None
    return Corpus(vocab, arrays["train"], arrays["valid"], arrays["test"])


def _open_ids(directory, split, meta, vocab_size):
    """One split's ids, memory-mapped and checked against what meta.json recorded."""
    a = np.load(os.path.join(directory, f"{split}.npy"), mmap_mode="r", allow_pickle=False)
    if a.shape != (meta["tokens"][split],) or a.dtype != np.dtype(meta["dtype"]):
        raise ValueError(f"{split}.npy has shape {a.shape} and type {a.dtype}")
    check = meta["checks"][split]
    digest = hashlib.sha256()
    for start in range(0, len(a), HASH_IDS):  # in slices: a mapped array need not be read into memory at once
        digest.update(memoryview(np.ascontiguousarray(a[start:start + HASH_IDS])).cast("B"))
    if digest.hexdigest() != check["sha256"]:
        raise ValueError(f"{split}.npy does not hold the ids it was written with")
    if not -1 <= check["max_id"] < vocab_size:
        raise ValueError(f"{split}.npy's largest id {check['max_id']} is not a word of the vocabulary")
    return a


def _move_into_place(tmp, final):
    """Rename the finished ``tmp`` to ``final``; a damaged ``final`` is replaced, a finished one (another
    process was quicker) kept."""
    if os.path.isdir(final):
        try:
            open_prepared(final)
            return
        except DataError:
            shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError as err:
        if not os.path.isdir(final):  # not a race lost to another process
            raise DataError(f"cannot write the corpus cache {final}: {err.strerror}") from None


def _remove_stale(cache_root, key):
    """Temporary directories of the same key left by prepares that were killed (their process is gone)."""
    for path in glob.glob(os.path.join(cache_root, f".tmp-{key[:24]}-*")):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def load_in_memory(files, min_freq=1, max_size=None, reading=Reading(), log=print):
    """The Corpus of ``files`` without a cache (data.cache: false): prepared in a temporary directory and
    read into memory."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="lmtrain-prepare-") as tmp:
        write_prepared(tmp, files, None, min_freq, max_size, reading, log)
        mapped = open_prepared(tmp)
        corpus = Corpus(mapped.vocab, *(np.array(mapped.split(s)) for s in SPLITS))
        del mapped  # no mapping may outlive the files (Windows cannot delete a mapped file)
    return corpus
