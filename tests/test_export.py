"""`lmtrain export` (lmtrain/export.py, docs/export.md): the ONNX graph in onnxruntime and the safetensors
file in PyTorch, each against lmtrain itself, and the bad inputs' one-line errors.

The models are freshly initialised, every parameter (biases included) drawn from U(-0.4, 0.4), not
trained: these tests check a mapping of weights, and random, distinct, non-zero values in every gate
block and bias make any misplaced block, missing transposition or dropped bias show, while 0.4 keeps
the gates neither near 0.5 everywhere nor saturated.  Training would cost minutes and add nothing a
mapping error could hide behind.  They run on the Penn Treebank's vocabulary and text where
$LMTRAIN_PTB_DIR points to it (skipped where it does not), and on the built-in stories everywhere.
"""

import math
import os
import re
import sys

import numpy as np
import pytest

from lmtrain.checkpoint import save_checkpoint
from lmtrain.config import from_dict
from lmtrain.data.sources import load_corpus
from lmtrain.data.vocab import Vocab
from lmtrain.errors import CheckpointError, LmtrainError
from lmtrain.export import ExportError, export, make_source, parameter_shapes
from tests.conftest import ROOT, needs, optional, ptb_dir

EXTRA = "pip install -e '.[export]'"


def make_checkpoint(path, model, vocab, dtype="float32", seed=0):
    """Write a checkpoint of config section ``model`` over ``vocab``, every parameter drawn from U(-0.4, 0.4).
    Only the file-level API: its parameters are those lmtrain.export reads (docs/checkpoint-format.md), and
    lmtrain's own model, rebuilding itself from the file below, checks that they are its parameters."""
    cfg = from_dict({"model": model, "train": {"dtype": dtype}, "seed": seed})
    rng = np.random.default_rng(seed)
    shapes = parameter_shapes(make_source(cfg, vocab, {}))
    params = {name: rng.uniform(-0.4, 0.4, shape).astype(dtype) for name, shape in shapes.items()}
    save_checkpoint(path, params, {"config": cfg.to_dict(), "vocab": vocab.to_dict()})
    return path


# -- lmtrain's model and evaluation: the only code here that builds or runs them ---------------------------
def lmtrain_model(ckpt_path):
    """The model lmtrain rebuilds from a checkpoint, its shapes checked against the config."""
    from lmtrain.build import model_from_checkpoint
    from lmtrain.checkpoint import load_checkpoint

    return model_from_checkpoint(load_checkpoint(ckpt_path))[0]


def lmtrain_windows(ckpt_path, ids, batch_size, bptt):
    """Yields (window ids (T, B), lmtrain's log-probabilities (T, B, V) as float64) over ``ids``, read as
    lmtrain's evaluation reads a split: its streams, its windows, the state carried from one to the next."""
    from lmtrain.data.batching import eval_streams, get_batch, window_starts

    model = lmtrain_model(ckpt_path)
    data, _ = eval_streams(ids, batch_size)
    state = model.init_state(batch_size)
    for i in window_starts(data, bptt):
        x, _ = get_batch(data, i, bptt)
        out, state = model.forward(np.asarray(x), state)
        scores = model.scores(out).astype(np.float64)  # the model's distribution is softmax(scores)
        yield x, log_softmax(scores).reshape(*x.shape, -1)


def lmtrain_perplexity(ckpt_path, ids, batch_size, bptt):
    """The perplexity lmtrain's own evaluation (`lmtrain eval`, the validation after each epoch) reports."""
    from lmtrain.evaluation import evaluate

    return evaluate(lmtrain_model(ckpt_path), ids, batch_size, bptt)[1]


# -- corpora, configs, the documented code ----------------------------------------------------------------
def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module", params=[pytest.param("ptb", marks=pytest.mark.ptb), "synthetic"])
def corpus(request):
    """PTB (its vocabulary of 10,000 words) where $LMTRAIN_PTB_DIR has it; the built-in stories always."""
    if request.param == "synthetic":
        stories = {"train_stories": 600, "valid_stories": 60, "test_stories": 60}
        return load_corpus(from_dict({"data": {"source": "synthetic", "synthetic": stories}}).data)
    root = ptb_dir()
    needs(
        "ptb",
        root is not None,
        "the Penn Treebank was not found (set LMTRAIN_PTB_DIR); the synthetic variant runs instead",
    )
    files = {split: str(root / f"{split}.txt") for split in ("train", "valid", "test")}
    return load_corpus(from_dict({"data": {"source": "text", "cache": False, **files}}).data, log=lambda _: None)


def model_config(cell, softmax, tie, vocab_size):
    """Two layers of different sizes (24, then 16 = the embedding size, so tying is possible)."""
    return {
        "cell": cell,
        "emb_size": 16,
        "hidden_size": 24,
        "num_layers": 2,
        "last_hidden_size": 16,
        "softmax": softmax,
        "tie_weights": tie != "untied",
        "adaptive_tie_tails": tie == "tied-tails",
        "adaptive_cutoffs": [max(2, vocab_size // 20), vocab_size // 4],
        "adaptive_div": 1 if tie == "tied-tails" else 2,
    }


def doc_code(name):
    """Run the code block of docs/export.md marked ``<!-- test_export: name -->``; returns its namespace, so
    the tests use the documented code itself and the doc cannot drift from what is checked."""
    text = (ROOT / "docs" / "export.md").read_text()
    found = re.search(rf"<!-- test_export: {name} -->\n```python\n(.*?)```", text, re.DOTALL)
    assert found, f"docs/export.md has no code block marked {name}"
    namespace = {"__name__": f"docs_export_{name.replace('-', '_')}"}
    exec(compile(found.group(1), f"docs/export.md[{name}]", "exec"), namespace)  # noqa: S102  our own doc
    return namespace


@pytest.fixture
def onnxruntime():
    optional("onnx", EXTRA)  # inside a fixture: skips (or, under LMTRAIN_REQUIRE, fails) the test alone
    return optional("onnxruntime", EXTRA)


@pytest.fixture
def safetensors():
    return optional("safetensors", EXTRA)


@pytest.fixture
def torch(safetensors):
    torch = optional("torch", "pip install torch==2.13.0 (the bench extra)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on the test machines' shared cores, more threads mostly wait for each other
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    vocab = Vocab(["<eos>", "<unk>", "a", "b", "c", "d"])
    return make_checkpoint(tmp_path / "tiny.npz", model_config("lstm", "full", "untied", len(vocab)), vocab)


# -- ONNX ---------------------------------------------------------------------------------------------------
CELLS = ("lstm", "gru", "rnn")
ONNX_VARIANTS = [
    (cell, softmax, tie) for cell in CELLS for softmax in ("full", "adaptive") for tie in ("untied", "tied")
] + [(cell, "adaptive", "tied-tails") for cell in CELLS]


def onnx_max_difference(ort, ckpt, onnx_path, ids, batch_size, bptt):
    """Largest |onnxruntime - lmtrain| over every log-probability of every window, state carried."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machines' cores are shared
    stream = doc_code("onnx-stream")["OnnxStream"](str(onnx_path), batch_size, options)
    worst, windows = 0.0, 0
    for x, expected in lmtrain_windows(ckpt, ids, batch_size, bptt):
        got = stream(x)
        assert got.shape == expected.shape and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected).max()))
        windows += 1
    assert windows > 1  # the state was carried at least once
    return worst


@pytest.mark.parametrize("cell,softmax,tie", ONNX_VARIANTS, ids=["-".join(v) for v in ONNX_VARIANTS])
def test_onnx_gives_lmtrains_log_probabilities(corpus, tmp_path, onnxruntime, cell, softmax, tie):
    """PTB: 3,000 validation tokens as 4 streams of 30 windows of 25 steps (every log-probability of the
    10,000 words compared); the stories: their whole validation split."""
    ckpt = make_checkpoint(tmp_path / "m.npz", model_config(cell, softmax, tie, len(corpus.vocab)), corpus.vocab)
    out = export(ckpt, "onnx", tmp_path / "m.onnx")
    worst = onnx_max_difference(onnxruntime, ckpt, out, corpus.valid[:3001], batch_size=4, bptt=25)
    print(f"onnx {cell} {softmax} {tie} V={len(corpus.vocab)}: max |onnxruntime - lmtrain| = {worst:.2e}")
    assert worst < 1e-4


def test_onnx_carries_vocabulary_and_names(tmp_path, onnxruntime, tiny_checkpoint):
    import onnx

    out = export(tiny_checkpoint, "onnx", tmp_path / "m.onnx")
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["ids", "h0_0", "c0_0", "h0_1", "c0_1"]
    assert [o.name for o in model.graph.output] == ["log_probs", "hn_0", "cn_0", "hn_1", "cn_1"]
    assert [n.op_type for n in model.graph.node].count("LSTM") == 2
    meta = onnxruntime.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert '"words": ["<eos>", "<unk>", "a"' in meta["lmtrain.vocab"]


def test_onnx_float64_checkpoint_exports_in_its_dtype_or_as_asked(tmp_path, onnxruntime):
    """float64 stays float64 (a valid graph, which onnxruntime's CPU recurrent kernels cannot run), and
    dtype="float32" gives one that runs and matches."""
    import onnx

    vocab = Vocab(["<eos>", "<unk>"] + [f"w{i}" for i in range(30)])
    ckpt = make_checkpoint(tmp_path / "m.npz", model_config("gru", "adaptive", "tied", len(vocab)), vocab, "float64")
    wide = onnx.load(str(export(ckpt, "onnx", tmp_path / "m64.onnx")))
    assert {t.data_type for t in wide.graph.initializer} >= {onnx.TensorProto.DOUBLE}
    out = export(ckpt, "onnx", tmp_path / "m32.onnx", dtype="float32")
    ids = np.random.default_rng(1).integers(0, len(vocab), 200)
    assert onnx_max_difference(onnxruntime, ckpt, out, ids, batch_size=3, bptt=10) < 1e-4


# -- safetensors --------------------------------------------------------------------------------------------
def torch_perplexity(torch, model, ids, batch_size, bptt):
    """exp(mean NLL) over every target of ``ids``, read in lmtrain's evaluation streams (docs/evaluation.md),
    laid out here independently: the N-1 targets in ``batch_size`` contiguous streams of L = ceil((N-1)/B)
    targets, the last stream padded, each read in windows of ``bptt`` steps with the state carried."""
    n = len(ids) - 1
    L = -(-n // batch_size)
    padded = np.zeros(L * batch_size + 1, np.int64)
    padded[: len(ids)] = ids
    data = np.stack([padded[b * L : b * L + L + 1] for b in range(batch_size)], axis=1)  # (L + 1, B)
    nll, state = [], None
    with torch.no_grad():
        for i in range(0, L, bptt):
            T = min(bptt, L - i)
            log_probs, state = model(torch.from_numpy(data[i : i + T]), state)
            targets = torch.from_numpy(data[i + 1 : i + 1 + T])
            nll.append(-log_probs.gather(2, targets[..., None])[..., 0])
    nll = torch.cat(nll).numpy()  # (L, B): stream b holds targets b*L .. b*L + L - 1
    return math.exp(nll.T.reshape(-1)[:n].mean())


# The two LSTMs read the whole test split; the other variants, cheaper, its first 5,000 tokens
SAFETENSORS_VARIANTS = [
    ("lstm", "full", "untied", None),
    ("lstm", "adaptive", "untied", None),
    ("lstm", "full", "tied", 5000),
    ("lstm", "adaptive", "tied-tails", 5000),
    ("gru", "full", "tied", 5000),
    ("gru", "adaptive", "untied", 5000),
    ("rnn", "full", "untied", 5000),
    ("rnn", "adaptive", "tied", 5000),
]


@pytest.mark.parametrize(
    "cell,softmax,tie,tokens", SAFETENSORS_VARIANTS, ids=["-".join(v[:3]) for v in SAFETENSORS_VARIANTS]
)
def test_safetensors_in_pytorch_gives_lmtrains_perplexity(corpus, tmp_path, torch, cell, softmax, tie, tokens):
    """docs/export.md's PyTorch module, loaded from the exported file, against lmtrain's evaluation, float64."""
    vocab = corpus.vocab
    ckpt = make_checkpoint(tmp_path / "m.npz", model_config(cell, softmax, tie, len(vocab)), vocab, "float64")
    out = export(ckpt, "safetensors", tmp_path / "m.safetensors")
    model, vocab_read = doc_code("torch-module")["load_lmtrain"](str(out))
    assert vocab_read == vocab.to_dict()
    ids = corpus.test[:tokens]
    ours = lmtrain_perplexity(ckpt, ids, batch_size=10, bptt=35)
    theirs = torch_perplexity(torch, model, ids, batch_size=10, bptt=35)
    print(
        f"safetensors {cell} {softmax} {tie} on {len(ids):,} tokens: lmtrain {ours:.10f}, PyTorch {theirs:.10f}, "
        f"relative difference {abs(theirs / ours - 1):.1e}"
    )
    assert theirs == pytest.approx(ours, rel=1e-8)


def test_safetensors_metadata(tmp_path, safetensors, tiny_checkpoint):
    import json

    out = export(tiny_checkpoint, "safetensors", tmp_path / "m.safetensors")
    with safetensors.safe_open(str(out), framework="np") as f:
        meta, names = f.metadata(), set(f.keys())
    assert meta["format"] == "lmtrain-safetensors" and json.loads(meta["config"])["model"]["cell"] == "lstm"
    assert json.loads(meta["architecture"])["layer_sizes"] == [24, 16]
    assert {"embedding.weight", "rnns.1.weight_ih_l0", "decoder.weight", "decoder.bias"} <= names


# -- bad input and writing --------------------------------------------------------------------------------
def one_line_error(error_type, *args, **kwargs):
    with pytest.raises(error_type) as info:
        export(*args, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, LmtrainError) and message and "\n" not in message
    return message


def test_unknown_format(tmp_path, tiny_checkpoint):
    assert "unknown export format 'pickle'" in one_line_error(ExportError, tiny_checkpoint, "pickle", tmp_path / "m")
    assert "unknown export dtype" in one_line_error(
        ExportError, tiny_checkpoint, "onnx", tmp_path / "m", dtype="float16"
    )


def test_output_in_a_missing_directory(tmp_path, tiny_checkpoint):
    message = one_line_error(ExportError, tiny_checkpoint, "safetensors", tmp_path / "nowhere" / "m.safetensors")
    assert "output directory does not exist" in message and "nowhere" in message
    assert "is a directory" in one_line_error(ExportError, tiny_checkpoint, "onnx", tmp_path)


def test_a_checkpoint_that_is_not_one(tmp_path):
    (tmp_path / "notes.npz").write_text("not a checkpoint\n")
    assert "not a readable .npz" in one_line_error(CheckpointError, tmp_path / "notes.npz", "onnx", tmp_path / "m")
    assert "checkpoint not found" in one_line_error(CheckpointError, tmp_path / "absent.npz", "onnx", tmp_path / "m")
    assert os.listdir(tmp_path) == ["notes.npz"]


def test_missing_extra_says_how_to_install_it(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    for fmt in ("onnx", "safetensors"):
        assert "pip install 'lmtrain[export]'" in one_line_error(ExportError, tiny_checkpoint, fmt, tmp_path / "m")


def test_never_overwrites_unless_asked_and_leaves_nothing_half_written(
    tmp_path, safetensors, tiny_checkpoint, monkeypatch
):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    assert "already exists" in one_line_error(ExportError, tiny_checkpoint, "safetensors", out)
    assert out.read_bytes() == b"keep me"
    assert export(tiny_checkpoint, "safetensors", out, overwrite=True) == str(out)
    assert out.read_bytes() != b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "tiny.npz"]  # no temporary file left

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert "No space left" in one_line_error(ExportError, tiny_checkpoint, "safetensors", tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "tiny.npz"]
