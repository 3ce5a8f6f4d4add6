"""Every bad input lmtrain is tried with: the command, what it must say, the exit code.

tests/test_bad_inputs.py runs each case; `python -m tests.bad_inputs` prints
the table of docs/reliability.md from the same cases (`make docs`).
"""

import contextlib
import io
import json
import os

import numpy as np

# A run the checkpoint cases start from (written once per test session).
TINY = """\
data:
  source: synthetic
  lowercase: true
  synthetic: {train_stories: 60, valid_stories: 10, test_stories: 10, max_distance: 2}
model: {emb_size: 8, hidden_size: 8}
train: {batch_size: 2, bptt: 5, epochs: 1, optimizer: adam, lr: 0.01, eval_batch_size: 2}
"""


def write(path, content):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as fh:
        fh.write(content)


def adaptive_cutoffs(cutoffs):
    """A setup writing c.yaml with the adaptive softmax and these cutoffs (YAML text)."""
    return lambda: write("c.yaml", f"model: {{softmax: adaptive, adaptive_cutoffs: {cutoffs}}}\n")


def text_corpus(train="a b c\nd e\n", valid="a b\n", test="c d\n", extra=""):
    """Files for data.source: text, and a config pointing at them."""
    for name, content in (("train", train), ("valid", valid), ("test", test)):
        if content is not None:
            write(f"corpus/{name}.txt", content)
    write(
        "text.yaml",
        "data: {source: text, train: corpus/train.txt, valid: corpus/valid.txt, "
        "test: corpus/test.txt}\ntrain: {batch_size: 1, bptt: 2, epochs: 1}\n" + extra,
    )


def resave(src, dst, edit):
    """Rewrite a checkpoint through lmtrain's own writer after ``edit(meta, params)``: a valid checksum."""
    from lmtrain.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(src)
    meta, params = dict(ck.meta), dict(ck.params)
    edit(meta, params)
    save_checkpoint(dst, params, meta, {k: v for k, v in ck.groups.items()})


def documented_sha256(arrays):
    """The checksum as docs/checkpoint-format.md describes it, written independently of lmtrain."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def meta_edit(src, dst, edit):
    """Change the JSON metadata of a checkpoint and re-sign it with a valid checksum."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "sha256"}
    meta = json.loads(str(arrays["meta"]))
    edit(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["sha256"] = np.array(documented_sha256(arrays))
    np.savez(dst, **arrays)


def raw_npz_edit(src, dst, edit):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(dst, **arrays)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


CKPT = "run/checkpoints/best.npz"


def huge_header():
    """An .npz whose one member's header claims a (2^40,) array (4 TB) it does not hold."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    with zipfile.ZipFile("huge.npz", "w") as zf:
        zf.writestr("meta.npy", header.getvalue() + bytes(16))


def deep_meta():
    """A checkpoint whose metadata is JSON nested 100,000 deep, with a valid checksum."""
    with np.load(CKPT, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "sha256"}
    arrays["meta"] = np.array("[" * 100_000 + "]" * 100_000)
    arrays["sha256"] = np.array(documented_sha256(arrays))
    np.savez("deep.npz", **arrays)


def text_run_then_edit():
    """A run on a text corpus, then its training file rewritten with two words' frequencies swapped."""
    words = "the cat sat on the mat . a dog ran after the cat .\n"
    text_corpus(train=words * 20, valid=words, test=words)
    assert run_main(["fit", "text.yaml", "--run-dir", "run", "--quiet"])[0] == 0
    write("corpus/train.txt", words.replace("the", "zzz").replace("cat", "the").replace("zzz", "cat") * 20)


def alias_bomb():
    rows = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    write("bomb.yaml", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + rows + "train: {lr: *i}\n")


def trained_then(setup):
    """A setup that needs the tiny run of TINY first."""
    return ("trained", setup)


# (id, what the user did, setup or None, argv, fragment of the one-line message, exit code)
CASES = [
    # -- configuration --------------------------------------------------------
    ("config-missing", "config file does not exist", None, ["fit", "nope.yaml"], "config file not found: nope.yaml", 2),
    (
        "config-directory",
        "config file is a directory",
        lambda: os.makedirs("cfgdir"),
        ["fit", "cfgdir"],
        "config file is a directory",
        2,
    ),
    (
        "yaml-syntax",
        "YAML syntax error",
        lambda: write("c.yaml", "model:\n  emb_size: 10\n  hidden_size: 3: 4\n"),
        ["fit", "c.yaml"],
        "c.yaml:3:17: invalid YAML: mapping values are not allowed here",
        2,
    ),
    (
        "yaml-duplicate",
        "the same key twice",
        lambda: write("c.yaml", "train:\n  lr: 1\n  lr: 2\n"),
        ["fit", "c.yaml"],
        "c.yaml:3:3: invalid YAML: duplicate key 'lr'",
        2,
    ),
    ("yaml-empty", "empty config file", lambda: write("c.yaml", ""), ["fit", "c.yaml"], "the config file is empty", 2),
    (
        "yaml-not-mapping",
        "config is a list",
        lambda: write("c.yaml", "- 1\n- 2\n"),
        ["fit", "c.yaml"],
        "expected a mapping of sections",
        2,
    ),
    (
        "yaml-not-utf8",
        "config is not UTF-8",
        lambda: write("c.yaml", "seed: 1 # caf\xe9\n".encode("latin-1")),
        ["fit", "c.yaml"],
        "not a UTF-8 text file",
        2,
    ),
    (
        "unknown-key",
        "misspelled key",
        lambda: write("c.yaml", "train:\n  lr_decy: 0.5\n"),
        ["fit", "c.yaml"],
        "unknown key 'train.lr_decy'; did you mean 'train.lr_decay'?",
        2,
    ),
    (
        "unknown-section",
        "misspelled section",
        lambda: write("c.yaml", "modle:\n  emb_size: 5\n"),
        ["fit", "c.yaml"],
        "unknown key 'modle'; did you mean 'model'?",
        2,
    ),
    (
        "section-not-mapping",
        "section given a number",
        lambda: write("c.yaml", "model: 5\n"),
        ["fit", "c.yaml"],
        "'model' must be a mapping",
        2,
    ),
    (
        "type-string",
        "text where a number belongs",
        lambda: write("c.yaml", "train:\n  batch_size: twenty\n"),
        ["fit", "c.yaml"],
        "'train.batch_size' must be an integer, got 'twenty'",
        2,
    ),
    (
        "type-bool",
        "true where a number belongs",
        lambda: write("c.yaml", "model:\n  hidden_size: true\n"),
        ["fit", "c.yaml"],
        "'model.hidden_size' must be an integer, got True",
        2,
    ),
    (
        "type-float",
        "fraction where an integer belongs",
        lambda: write("c.yaml", "train:\n  bptt: 3.5\n"),
        ["fit", "c.yaml"],
        "'train.bptt' must be an integer, got 3.5",
        2,
    ),
    (
        "size-zero",
        "non-positive size",
        lambda: write("c.yaml", "model:\n  hidden_size: 0\n"),
        ["fit", "c.yaml"],
        "'model.hidden_size' must be at least 1, got 0",
        2,
    ),
    (
        "seed-negative",
        "negative seed",
        lambda: write("c.yaml", "seed: -1\n"),
        ["fit", "c.yaml"],
        "'seed' must be at least 0",
        2,
    ),
    (
        "dropout-range",
        "dropout above 1",
        lambda: write("c.yaml", "model:\n  dropout: 1.5\n"),
        ["fit", "c.yaml"],
        "'model.dropout' must be at most 1.0, got 1.5",
        2,
    ),
    (
        "lr-nan",
        "learning rate .nan",
        lambda: write("c.yaml", "train:\n  lr: .nan\n"),
        ["fit", "c.yaml"],
        "'train.lr' must be a finite number",
        2,
    ),
    (
        "bad-choice",
        "unknown optimizer",
        lambda: write("c.yaml", "train:\n  optimizer: rmsprop\n"),
        ["fit", "c.yaml"],
        "'train.optimizer' must be one of sgd, adam, adamw, ntasgd; got 'rmsprop'",
        2,
    ),
    (
        "tie-sizes",
        "tying with unequal sizes",
        lambda: write("c.yaml", "model: {emb_size: 10, hidden_size: 20, tie_weights: true}\n"),
        ["fit", "c.yaml"],
        "model.tie_weights needs model.emb_size == model.hidden_size",
        2,
    ),
    (
        "adaptive-no-cutoffs",
        "adaptive softmax without cutoffs",
        lambda: write("c.yaml", "model: {softmax: adaptive}\n"),
        ["fit", "c.yaml"],
        "model.softmax adaptive needs model.adaptive_cutoffs",
        2,
    ),
    (
        "cutoffs-order",
        "adaptive cutoffs not increasing",
        adaptive_cutoffs("[2000, 500]"),
        ["fit", "c.yaml"],
        "model.adaptive_cutoffs must be strictly increasing",
        2,
    ),
    (
        "cutoffs-empty-cluster",
        "a tail cluster with no word (a cutoff twice)",
        adaptive_cutoffs("[500, 500]"),
        ["fit", "c.yaml"],
        "each tail cluster needs at least one word",
        2,
    ),
    (
        "cutoffs-not-list",
        "adaptive cutoffs given as one number",
        adaptive_cutoffs("2000"),
        ["fit", "c.yaml"],
        "'model.adaptive_cutoffs' must be a list of integers or null",
        2,
    ),
    (
        "cutoffs-vocab",
        "a cutoff past the vocabulary",
        lambda: write("c.yaml", TINY),
        ["fit", "c.yaml", "--set", "model.softmax=adaptive", "--set", "model.adaptive_cutoffs=[10,2000]"],
        "every cutoff must be below the vocabulary size",
        2,
    ),
    (
        "bench-cutoffs-vocab",
        "bench with a vocabulary below a cutoff",
        lambda: write("c.yaml", TINY),
        [
            "bench",
            "c.yaml",
            "--vocab-size",
            "50",
            "--set",
            "model.softmax=adaptive",
            "--set",
            "model.adaptive_cutoffs=[100]",
        ],
        "every cutoff must be below the vocabulary size, 50 words",
        2,
    ),
    (
        "text-no-path",
        "text source with a test file but no validation file",
        lambda: write("c.yaml", "data: {source: text, train: a.txt, test: b.txt}\n"),
        ["fit", "c.yaml"],
        "data.test is set but data.valid is not",
        2,
    ),
    (
        "distance-order",
        "min_distance above max_distance",
        lambda: write("c.yaml", "data: {synthetic: {min_distance: 9, max_distance: 3}}\n"),
        ["fit", "c.yaml"],
        "min_distance (9) is larger than data.synthetic.max_distance (3)",
        2,
    ),
    (
        "set-no-equals",
        "--set without a value",
        lambda: write("c.yaml", TINY),
        ["fit", "c.yaml", "--set", "train.lr"],
        "--set 'train.lr': expected key.path=value",
        2,
    ),
    (
        "set-unknown",
        "--set of an unknown key",
        lambda: write("c.yaml", TINY),
        ["fit", "c.yaml", "--set", "model.hiden_size=3"],
        "did you mean 'model.hidden_size'?",
        2,
    ),
    (
        "set-bad-value",
        "--set of an invalid value",
        lambda: write("c.yaml", TINY),
        ["fit", "c.yaml", "--set", "train.epochs=-1"],
        "'train.epochs' must be at least 1, got -1",
        2,
    ),
    # -- corpora --------------------------------------------------------------
    (
        "corpus-missing",
        "training file does not exist",
        lambda: text_corpus(train=None),
        ["fit", "text.yaml"],
        "train file not found: corpus/train.txt",
        2,
    ),
    (
        "corpus-directory",
        "training directory without files",
        lambda: (text_corpus(train=None), os.makedirs("corpus/train.txt")),
        ["fit", "text.yaml"],
        "train directory corpus/train.txt holds no files",
        2,
    ),
    (
        "corpus-list-missing",
        "one file of a list does not exist",
        lambda: (
            text_corpus(),
            write(
                "l.yaml",
                "data: {source: text, train: [corpus/train.txt, corpus/more.txt], "
                "valid: corpus/valid.txt, test: corpus/test.txt}\n",
            ),
        ),
        ["fit", "l.yaml"],
        "train file not found: corpus/more.txt",
        2,
    ),
    (
        "corpus-paths-type",
        "a number where paths belong",
        lambda: write("c.yaml", "data: {source: text, train: 5, valid: v.txt, test: t.txt}\n"),
        ["fit", "c.yaml"],
        "'data.train' must be a path or a list of paths, got 5",
        2,
    ),
    (
        "prepare-no-cache",
        "prepare with the cache turned off",
        lambda: text_corpus(),
        ["prepare", "text.yaml", "--set", "data.cache=false"],
        "data.cache is false in text.yaml",
        2,
    ),
    (
        "corpus-empty",
        "empty training file",
        lambda: text_corpus(train=""),
        ["fit", "text.yaml"],
        "the train split (corpus/train.txt) has no tokens",
        2,
    ),
    (
        "valid-no-tokens",
        "validation file of blank lines",
        lambda: text_corpus(valid="\n \n\n"),
        ["fit", "text.yaml"],
        "the valid split (corpus/valid.txt) has no tokens",
        2,
    ),
    (
        "corpus-binary",
        "a binary file as corpus",
        lambda: text_corpus(train=b"\x7fELF\x02\x01\x00\x00"),
        ["fit", "text.yaml"],
        "looks binary (NUL byte on line 1)",
        2,
    ),
    (
        "corpus-not-utf8",
        "Latin-1 text",
        lambda: text_corpus(train="ok\ncaf\xe9\n".encode("latin-1")),
        ["fit", "text.yaml"],
        "is not UTF-8 text (bad byte on line 2, column 4)",
        2,
    ),
    (
        "corpus-long-line",
        "a 17 MiB line",
        lambda: text_corpus(train="w " * (17 << 19) + "\n"),
        ["fit", "text.yaml"],
        "line 1 is longer than 16 MiB",
        2,
    ),
    (
        "batch-too-large",
        "more streams than tokens",
        lambda: text_corpus(extra="seed: 0\n"),
        ["fit", "text.yaml", "--set", "train.batch_size=5"],
        "train.batch_size 5 is too large",
        2,
    ),
    (
        "bptt-too-long",
        "window longer than the streams",
        lambda: text_corpus(),
        ["fit", "text.yaml", "--set", "train.bptt=50"],
        "train.bptt 50 is longer than the 6 steps",
        2,
    ),
    (
        "ptb-no-download",
        "PTB absent, download disabled",
        lambda: write("p.yaml", "data: {source: ptb, root: nowhere, download: false}\n"),
        ["fit", "p.yaml"],
        "PTB train file not found under nowhere and data.download is false",
        2,
    ),
    (
        "ptb-offline",
        "PTB absent, machine offline",
        lambda: write("p.yaml", "data: {source: ptb, root: ptbdir, url: 'http://127.0.0.1:0/'}\n"),
        ["fit", "p.yaml"],
        "could not download",
        2,
    ),
    (
        "ptb-modified",
        "a PTB file that is not the standard one",
        lambda: (
            [write(f"ptbdir/{s}.txt", "a b\n") for s in ("train", "valid", "test")]
            and write("p.yaml", "data: {source: ptb, root: ptbdir}\n")
        ),
        ["fit", "p.yaml"],
        "ptbdir/train.txt is not the standard PTB train file (SHA-256 mismatch)",
        2,
    ),
    (
        "wikitext-no-download",
        "WikiText absent, download disabled",
        lambda: write("w.yaml", "data: {source: wikitext-2, root: nowhere, download: false}\n"),
        ["fit", "w.yaml"],
        "WikiText-2 not found under nowhere and data.download is false; put wiki.train.tokens",
        2,
    ),
    (
        "wikitext-offline",
        "WikiText absent, machine offline",  # port 0: refused at once, on every run
        lambda: write("w.yaml", "data: {source: wikitext-103, root: wt, url: 'http://127.0.0.1:0/wt103.zip'}\n"),
        ["prepare", "w.yaml"],
        "could not download http://127.0.0.1:0/wt103.zip",
        2,
    ),
    (
        "wikitext-foreign-archive",
        "another zip where the WikiText archive belongs",
        lambda: (
            write("wt/wikitext-2-v1.zip", b"PK\x03\x04 some other archive"),
            write("w.yaml", "data: {source: wikitext-2, root: wt}\n"),
        ),
        ["fit", "w.yaml"],
        "wt/wikitext-2-v1.zip is not the WikiText-2 archive (SHA-256 mismatch)",
        2,
    ),
    # -- run directories ------------------------------------------------------
    (
        "run-exists",
        "fit into another run's directory",
        "trained",
        ["fit", "c.yaml", "--run-dir", "run"],
        "run directory run already holds a run",
        2,
    ),
    (
        "resume-nothing",
        "--resume with no checkpoint",
        lambda: write("c.yaml", TINY),
        ["fit", "c.yaml", "--run-dir", "fresh", "--resume"],
        "nothing to resume: fresh/checkpoints/last.npz",
        2,
    ),
    (
        "resume-overwrite",
        "--resume with --overwrite",
        lambda: write("c.yaml", TINY),
        ["fit", "c.yaml", "--resume", "--overwrite"],
        "--resume and --overwrite contradict each other",
        2,
    ),
    (
        "resume-changed",
        "resume with another model size",
        "trained",
        ["fit", "c.yaml", "--run-dir", "run", "--resume", "--set", "model.hidden_size=9"],
        "cannot resume run/checkpoints/last.npz with a different model or data: model.hidden_size: 8 -> 9",
        2,
    ),
    (
        "run-dir-file",
        "run directory is a file",
        lambda: (write("c.yaml", TINY), write("afile", "x")),
        ["fit", "c.yaml", "--run-dir", "afile"],
        "cannot create run directory afile",
        2,
    ),
    # -- checkpoints ----------------------------------------------------------
    (
        "ckpt-missing",
        "checkpoint does not exist",
        None,
        ["eval", "--ckpt", "none.npz"],
        "checkpoint not found: none.npz",
        2,
    ),
    (
        "ckpt-truncated",
        "checkpoint cut in half",
        trained_then(lambda: write("cut.npz", open(CKPT, "rb").read()[:3000])),
        ["eval", "--ckpt", "cut.npz"],
        "cut.npz is not a readable .npz file",
        2,
    ),
    (
        "ckpt-random",
        "random bytes",
        lambda: write("junk.npz", os.urandom(500)),
        ["eval", "--ckpt", "junk.npz"],
        "junk.npz is not a readable .npz file",
        2,
    ),
    (
        "ckpt-foreign",
        "an .npz of another tool",
        lambda: np.savez("foreign.npz", w=np.zeros(2)),
        ["eval", "--ckpt", "foreign.npz"],
        "foreign.npz is not an lmtrain checkpoint (it has no 'meta' entry)",
        2,
    ),
    (
        "ckpt-npy",
        "a single .npy array",
        lambda: np.save("arr.npy", np.zeros(2)),
        ["eval", "--ckpt", "arr.npy"],
        "arr.npy is a single .npy array",
        2,
    ),
    (
        "ckpt-pickle",
        "an .npz holding a pickled object",
        trained_then(
            lambda: raw_npz_edit(CKPT, "evil.npz", lambda a: a.update({"param/x": np.array([Evil()], dtype=object)}))
        ),
        ["eval", "--ckpt", "evil.npz"],
        "holds a pickled object in 'param/x'",
        2,
    ),
    (
        "ckpt-tampered",
        "a weight changed after saving",
        trained_then(
            lambda: raw_npz_edit(
                CKPT, "tampered.npz", lambda a: a.update({"param/decoder.bias": a["param/decoder.bias"] + 1})
            )
        ),
        ["eval", "--ckpt", "tampered.npz"],
        "fails its SHA-256 check",
        2,
    ),
    (
        "ckpt-version",
        "an unknown format version",
        trained_then(lambda: meta_edit(CKPT, "future.npz", lambda m: m.update(format_version=99))),
        ["eval", "--ckpt", "future.npz"],
        "has checkpoint format version 99; this lmtrain reads version 1",
        2,
    ),
    (
        "ckpt-vocab",
        "vocabulary smaller than the weights",
        trained_then(lambda: resave(CKPT, "vocab.npz", lambda m, p: m["vocab"].update(words=m["vocab"]["words"][:-3]))),
        ["eval", "--ckpt", "vocab.npz"],
        "parameter 'embedding.weight' has shape",
        2,
    ),
    (
        "ckpt-shape",
        "an array of the wrong shape",
        trained_then(lambda: resave(CKPT, "shape.npz", lambda m, p: p.update({"rnn.0.bias": np.zeros(5, np.float32)}))),
        ["eval", "--ckpt", "shape.npz"],
        "parameter 'rnn.0.bias' has shape (5,), expected (32,)",
        2,
    ),
    (
        "ckpt-missing-array",
        "a parameter array removed",
        trained_then(lambda: resave(CKPT, "less.npz", lambda m, p: p.pop("decoder.bias"))),
        ["eval", "--ckpt", "less.npz"],
        "lacks parameter 'decoder.bias'",
        2,
    ),
    (
        "ckpt-huge-shape",
        "an array whose header claims 2^40 numbers, in a 200-byte file",
        huge_header,
        ["eval", "--ckpt", "huge.npz"],
        "claims shape (1099511627776,)",
        2,
    ),
    (
        "ckpt-deep-meta",
        "metadata nested 100,000 deep, re-signed",
        trained_then(deep_meta),
        ["eval", "--ckpt", "deep.npz"],
        "its 'meta' entry is not JSON",
        2,
    ),
    (
        "eval-vocab-changed",
        "the training text changed since the model was trained on it",
        text_run_then_edit,
        ["eval", "--ckpt", "run/checkpoints/best.npz"],
        "now gives another vocabulary than the one the model",
        2,
    ),
    (
        "score-empty",
        "a file with no lines to score",
        ("trained", lambda: write("empty.txt", "")),
        ["score", "--ckpt", CKPT, "empty.txt"],
        "no lines to score: the input is empty",
        2,
    ),
    (
        "score-not-utf8",
        "a file to score that is not UTF-8",
        ("trained", lambda: write("bad.txt", b"ok\n\xff\n")),
        ["score", "--ckpt", CKPT, "bad.txt"],
        "bad.txt is not UTF-8 text (bad byte on line 2)",
        2,
    ),
    (
        "score-not-a-checkpoint",
        "scoring with a file that is not a checkpoint",
        lambda: (write("fake.npz", b"not a zip"), write("s.txt", "a b\n")),
        ["score", "--ckpt", "fake.npz", "s.txt"],
        "fake.npz is not a readable .npz file",
        2,
    ),
    (
        "export-format",
        "an export format lmtrain does not write",
        "trained",
        ["export", "--ckpt", CKPT, "--format", "tflite", "--out", "m.tflite"],
        "Invalid value for '--format'",
        2,
    ),
    (
        "export-missing-dir",
        "an export into a directory that does not exist",
        "trained",
        ["export", "--ckpt", CKPT, "--format", "safetensors", "--out", "no/such/dir/m.safetensors"],
        "no/such/dir",
        2,
    ),
    (
        "export-not-a-checkpoint",
        "exporting a file that is not a checkpoint",
        lambda: write("fake.npz", b"not a zip"),
        ["export", "--ckpt", "fake.npz", "--format", "onnx", "--out", "m.onnx"],
        "fake.npz is not a readable .npz",
        2,
    ),
    (
        "config-alias-bomb",
        "a 400-byte config whose aliases expand to a billion values",
        alias_bomb,
        ["fit", "bomb.yaml"],
        "aliases that expand to more than 100,000 values",
        2,
    ),
    (
        "config-two-unknown",
        "two unknown keys, named as other tools name them",
        lambda: write("c.yaml", "train: {learning_rate: 1, seq_len: 70}\n"),
        ["fit", "c.yaml"],
        "unknown keys 'train.learning_rate' (did you mean 'train.lr'?)",
        2,
    ),
    # -- prompts --------------------------------------------------------------
    ("prompt-empty", "empty prompt", "trained", ["generate", "--ckpt", CKPT, "--prompt", ""], "the prompt is empty", 2),
    (
        "prompt-blank",
        "prompt of spaces",
        "trained",
        ["generate", "--ckpt", CKPT, "--prompt", "   "],
        "the prompt is empty",
        2,
    ),
    (
        "prompt-unknown",
        "only unknown words",
        "trained",
        ["generate", "--ckpt", CKPT, "--prompt", "zyzzyva qux"],
        "none of the prompt's words is in the vocabulary",
        2,
    ),
    (
        "prompt-long",
        "a 25,000-word prompt",
        "trained",
        ["generate", "--ckpt", CKPT, "--prompt", "tom " * 25000],
        "the prompt has 25,000 words; at most 20,000 are read",
        2,
    ),
    # -- command line ---------------------------------------------------------
    ("cli-command", "unknown command", None, ["frobnicate"], "No such command 'frobnicate'", 2),
    (
        "cli-no-run",
        "eval without --ckpt where no run was trained",
        None,
        ["eval"],
        "no --ckpt given and no checkpoint under runs/",
        2,
    ),
    (
        "cli-choice",
        "--split train",
        "trained",
        ["eval", "--ckpt", CKPT, "--split", "train"],
        "Invalid value for '--split'",
        2,
    ),
    (
        "cli-batch-zero",
        "--batch-size 0",
        "trained",
        ["eval", "--ckpt", CKPT, "--batch-size", "0"],
        "Invalid value for '--batch-size'",
        2,
    ),
    (
        "cli-cache-batch",
        "--cache with --batch-size 4",
        "trained",
        ["eval", "--ckpt", CKPT, "--cache", "--batch-size", "4"],
        "--cache and --dynamic read the split as one stream: --batch-size must be 1",
        2,
    ),
    (
        "cli-cache-lambda",
        "--cache-lambda 1.5",
        "trained",
        ["eval", "--ckpt", CKPT, "--cache", "--cache-lambda", "1.5"],
        "Invalid value for '--cache-lambda'",
        2,
    ),
    (
        "cli-dyn-lr",
        "--dyn-lr -1",
        "trained",
        ["eval", "--ckpt", CKPT, "--dynamic", "--dyn-lr", "-1"],
        "Invalid value for '--dyn-lr'",
        2,
    ),
    (
        "cli-tune-method",
        "tune-eval --method beam",
        "trained",
        ["tune-eval", "--ckpt", CKPT, "--method", "beam"],
        "Invalid value for '--method'",
        2,
    ),
    (
        "cli-temperature",
        "--temperature 0",
        "trained",
        ["generate", "--ckpt", CKPT, "--prompt", "a", "--temperature", "0"],
        "Invalid value for '--temperature'",
        2,
    ),
    (
        "cli-top-p",
        "--top-p 1.5",
        "trained",
        ["generate", "--ckpt", CKPT, "--prompt", "a", "--top-p", "1.5"],
        "Invalid value for '--top-p'",
        2,
    ),
    (
        "cli-max-tokens",
        "--max-tokens -1",
        "trained",
        ["generate", "--ckpt", CKPT, "--prompt", "a", "--max-tokens", "-1"],
        "Invalid value for '--max-tokens'",
        2,
    ),
    (
        "eval-text-missing",
        "eval --text of a missing file",
        "trained",
        ["eval", "--ckpt", CKPT, "--text", "no.txt"],
        "text file not found: no.txt",
        2,
    ),
    (
        "eval-text-empty",
        "eval --text of an empty file",
        trained_then(lambda: write("empty.txt", "")),
        ["eval", "--ckpt", CKPT, "--text", "empty.txt"],
        "text file empty.txt has no tokens",
        2,
    ),
    (
        "generate-no-run",
        "generate with no run to use",
        lambda: os.makedirs("elsewhere"),
        ["generate", "--prompt", "hello"],
        "no --ckpt given and no checkpoint under runs/",
        2,
    ),
]


def run_main(argv):
    """(exit code, stdout, stderr) of lmtrain's entry point, in this process."""
    from lmtrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def train_tiny():
    write("c.yaml", TINY)
    code, _, err = run_main(["fit", "c.yaml", "--run-dir", "run", "--quiet"])
    assert code == 0, err


def prepare(case):
    """Set up a case in the current directory; return its argv."""
    _, _, setup, argv, _, _ = case
    if isinstance(setup, tuple):
        train_tiny()
        setup = setup[1]
    elif setup == "trained":
        train_tiny()
    if callable(setup):
        setup()
    if argv and argv[0] == "generate" and "--ckpt" not in argv and os.path.isdir("elsewhere"):
        os.chdir("elsewhere")
    return argv


def markdown():
    """The table of docs/reliability.md, from running every case in a scratch directory."""
    import tempfile

    rows = ["| # | bad input | command | message (first words) | exit | test |", "|---|---|---|---|---|---|"]
    home = os.getcwd()
    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                argv = prepare(case)
                code, _, err = run_main(argv)
            finally:
                os.chdir(home)
        shown = " ".join(a if len(a) < 40 else a[:20] + "..." for a in argv)
        message = err.strip().splitlines()[-1] if err.strip() else ""
        message = message if len(message) < 160 else message[:157] + "..."
        rows.append(
            f"| {i} | {case[1]} | `lmtrain {shown}` | {message.replace('|', '/')} | {code} | "
            f"`test_bad_input[{case[0]}]` |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
