"""The adaptive softmax: exact probabilities, its loss against the full table, tying, checkpoints, commands.

Its backward is checked by finite differences in tests/test_gradients.py, and against PyTorch's
AdaptiveLogSoftmaxWithLoss in tests/test_against_torch.py.
"""

import json

import numpy as np
import pytest

from lmtrain.build import model_from_checkpoint
from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.config import ModelConfig, from_dict
from lmtrain.data.batching import eval_streams
from lmtrain.data.vocab import Vocab
from lmtrain.errors import ConfigError
from lmtrain.evaluation import evaluate
from lmtrain.nn.adaptive import tail_shapes
from lmtrain.nn.layers import SoftmaxCrossEntropy
from lmtrain.nn.model import REFERENCE, LanguageModel


def adaptive_layer(d, V, cutoffs, div, seed, tied_head=False, scale=1.0, layers=REFERENCE):
    """An AdaptiveSoftmax with random float64 parameters; ``tied_head``: its head block transposed, as when
    its word rows are embedding rows; ``layers``: the classes it is made of."""
    rng = np.random.default_rng(seed)
    width = len(cutoffs) + cutoffs[0]
    head = rng.standard_normal((width, d + 1) if tied_head else (d + 1, width)) * scale
    tails = []
    for units, words in tail_shapes(d, V, cutoffs, div):
        P = rng.standard_normal((d, units)) * scale
        tails.append((P, np.zeros_like(P), layers.Linear(rng.standard_normal((units + 1, words)) * scale)))
    return layers.AdaptiveSoftmax(
        cutoffs, V, layers.Linear(head, transposed=tied_head), tails, loss=layers.SoftmaxCrossEntropy
    )


CASES = [  # (d, V, cutoffs, div, tied head)
    (8, 50, [10], 4.0, False),
    (8, 50, [5, 20, 30], 2.0, True),
    (16, 300, [1, 2, 100], 4.0, False),  # a one-word head and a one-word cluster
    (3, 40, [20, 39], 8.0, False),  # projections of 1 unit; a last cluster of one word
]


@pytest.mark.parametrize("d,V,cutoffs,div,tied", CASES)
def test_probabilities_of_every_word_sum_to_one(d, V, cutoffs, div, tied):
    layer = adaptive_layer(d, V, cutoffs, div, seed=1, tied_head=tied, scale=2.0)  # peaked distributions
    h = np.random.default_rng(2).standard_normal((20, d)) * 3
    logp = layer.log_probs(h)
    assert logp.shape == (20, V) and np.all(np.isfinite(logp))
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("d,V,cutoffs,div,tied", CASES)
def test_loss_is_the_nll_read_from_the_full_table(d, V, cutoffs, div, tied):
    """(mean, sum, count) as SoftmaxCrossEntropy gives them on the exact log-probabilities (whose own
    softmax is themselves), with and without padding weights."""
    layer = adaptive_layer(d, V, cutoffs, div, seed=3, tied_head=tied)
    rng = np.random.default_rng(4)
    h = rng.standard_normal((30, d))
    targets = rng.integers(0, V, size=(6, 5))
    for weights in (None, (rng.random((6, 5)) < 0.7).astype(np.float64)):
        expected = SoftmaxCrossEntropy().forward(layer.log_probs(h), targets, weights)
        got = layer.forward(h, targets, weights)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_each_cluster_computes_on_its_own_rows_only():
    """Where the speed comes from: the head sees all rows over K + c_0 columns, cluster i only the rows
    whose target is in it; nothing on the loss path is V wide."""
    layer = adaptive_layer(6, 1000, [10, 100], 4.0, seed=7)
    targets = np.array([0, 5, 9, 10, 99, 100, 999, 3, 500, 2])
    layer.forward(np.random.default_rng(8).standard_normal((10, 6)), targets)
    layer.backward()
    assert layer.head_loss.exps.shape == (10, 2 + 10)
    assert [loss.exps.shape for loss in layer.tail_losses] == [(2, 90), (3, 900)]
    # projections of 6 // 4 = 1 unit and of at least 1 (6 // 16 = 0), plus the ones column
    assert [out.x1.shape for out in layer.outs] == [(2, 1 + 1), (3, 1 + 1)]


def test_log_probs_leave_the_training_buffers_alone():
    """Reading the table between a loss and its backward (as a probe may) changes no gradient."""
    layer = adaptive_layer(6, 30, [5, 12], 2.0, seed=5)
    rng = np.random.default_rng(6)
    h, targets = rng.standard_normal((10, 6)), rng.integers(0, 30, size=10)
    layer.forward(h, targets)
    dh = layer.backward().copy()
    grads = {k: g.copy() for k, g in layer.grads.items()}
    layer.forward(h, targets)
    layer.log_probs(rng.standard_normal((3, 6)))
    np.testing.assert_array_equal(layer.backward(), dh)
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, grads[k], err_msg=k)


def adaptive_config(tied=False, **extra):
    return ModelConfig(
        emb_size=8, hidden_size=8, num_layers=1, tie_weights=tied, softmax="adaptive", adaptive_cutoffs=[6, 15], **extra
    )


@pytest.mark.parametrize("tied,tie_tails", [(False, False), (True, False), (True, True)])
def test_the_model_scores_and_evaluates_exactly(tied, tie_tails):
    """The model's scores are a distribution, evaluation's NLL is read off them, and the tied head's
    word rows are the embedding's rows (same memory), while the tails own theirs unless they are tied
    too."""
    V = 40
    extra = dict(adaptive_div=1.0, adaptive_tie_tails=True) if tie_tails else {}
    model = LanguageModel(adaptive_config(tied, init="pytorch", **extra), V, seed=1, dtype="float64")
    ids = np.random.default_rng(7).integers(0, V, size=301)
    out, _ = model.forward(ids[:-1].reshape(30, 10), model.init_state(10))
    logp = model.scores(out)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-9)
    # evaluate() reads the loss path in windows of 9, with the last stream padded; here each stream is
    # one window, its NLL read off the table
    loss, _, count = evaluate(model, ids, batch_size=7, bptt=9)
    data, weights = eval_streams(ids, 7)
    nll = 0.0
    for b in range(7):
        out, _ = model.forward(data[:-1, b : b + 1], model.init_state(1))
        nll -= (weights[:, b] * model.scores(out)[np.arange(len(data) - 1), data[1:, b]]).sum()
    assert count == len(ids) - 1 == weights.sum() < weights.size
    assert loss == pytest.approx(nll / count, rel=1e-10)
    head = model.loss_layer.params["head.weight"]
    if tied:
        K = 2
        assert head.shape == (K + 6, 8)
        assert np.shares_memory(head[K:], model.params["embedding.weight"])
        np.testing.assert_array_equal(head[K:], model.params["embedding.weight"][:6])
    else:
        assert head.shape == (8, 2 + 6) and not np.shares_memory(head, model.params["embedding.weight"])
    E = model.params["embedding.weight"]
    for i, (lo, hi) in enumerate([(6, 15), (15, V)]):
        tail = model.loss_layer.params[f"tail.{i}.weight"]
        if tie_tails:  # the cluster's words' embedding rows, the bias beside them; no projection
            assert "tail.0.proj" not in model.loss_layer.params and f"adaptive.tail.{i}.weight" not in model.params
            assert np.shares_memory(tail, E) and tail.shape == (hi - lo, 8)
            np.testing.assert_array_equal(tail, E[lo:hi])
            assert np.shares_memory(model.loss_layer.params[f"tail.{i}.bias"], model.params[f"adaptive.tail.{i}.bias"])
        else:
            assert not np.shares_memory(model.params[f"adaptive.tail.{i}.weight"], E)


def test_tied_tails_have_the_tied_full_softmax_parameters():
    """Tied tails add only the K = 2 cluster rows (8 weights and a bias each) to the tied full softmax's
    parameters."""
    full = LanguageModel(ModelConfig(emb_size=8, hidden_size=8, num_layers=1, tie_weights=True), 40, seed=0)
    tails = LanguageModel(adaptive_config(True, adaptive_div=1.0, adaptive_tie_tails=True), 40, seed=0)
    assert tails.num_params() == full.num_params() + 2 * 9
    assert tails.store.data.size == full.store.data.size + 2 * 9


def test_parameters_and_their_shapes():
    """docs/checkpoint-format.md's table: projections of hidden / div^(i+1) units."""
    cfg = ModelConfig(emb_size=32, hidden_size=32, softmax="adaptive", adaptive_cutoffs=[10, 50, 100])
    shapes = {k: v.shape for k, v in LanguageModel(cfg, 300, seed=0).params.items()}
    assert "decoder.weight" not in shapes and "decoder.bias" not in shapes
    assert shapes["adaptive.head.weight"] == (32, 3 + 10) and shapes["adaptive.head.bias"] == (13,)
    assert [shapes[f"adaptive.tail.{i}.proj"] for i in range(3)] == [(32, 8), (32, 2), (32, 1)]
    assert [shapes[f"adaptive.tail.{i}.weight"] for i in range(3)] == [(8, 40), (2, 50), (1, 200)]
    assert [shapes[f"adaptive.tail.{i}.bias"] for i in range(3)] == [(40,), (50,), (200,)]


def test_cutoffs_are_checked_against_the_vocabulary_when_the_model_is_built():
    with pytest.raises(ConfigError, match=r"every cutoff must be below the vocabulary size, 15 words"):
        LanguageModel(adaptive_config(), 15)
    LanguageModel(adaptive_config(), 16)  # the last cluster holds one word


def test_config_rules():
    ok = from_dict({"model": {"softmax": "adaptive", "adaptive_cutoffs": [20, 60]}})
    assert ok.model.adaptive_cutoffs == [20, 60] and ok.model.adaptive_div == 4.0
    assert from_dict({}).model.softmax == "full"
    for cutoffs, message in [
        (None, "needs model.adaptive_cutoffs"),
        ([], "needs model.adaptive_cutoffs"),
        ([20, 20], "strictly increasing"),
        ([60, 20], "strictly increasing"),
        ([0, 20], r"'model.adaptive_cutoffs\[0\]' must be at least 1"),
        ([20, "x"], r"'model.adaptive_cutoffs\[1\]' must be an integer"),
        (2000, "must be a list of integers or null"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict({"model": {"softmax": "adaptive", "adaptive_cutoffs": cutoffs}})
    tied = {
        "softmax": "adaptive",
        "adaptive_cutoffs": [20],
        "tie_weights": True,
        "adaptive_div": 1,
        "adaptive_tie_tails": True,
    }
    assert from_dict({"model": tied}).model.adaptive_tie_tails
    for change in [{"tie_weights": False}, {"adaptive_div": 2}]:
        with pytest.raises(
            ConfigError, match="adaptive_tie_tails .* needs model.tie_weights true and model.adaptive_div 1"
        ):
            from_dict({"model": {**tied, **change}})
    # as the other adaptive_* keys, ignored under the full softmax: `--set model.softmax=full` is enough
    # to compare the speedrun preset with the full softmax
    assert from_dict({"model": {**tied, "softmax": "full"}}).model.softmax == "full"


@pytest.mark.parametrize("tied,tie_tails", [(False, False), (True, False), (True, True)])
def test_checkpoint_round_trip(tmp_path, tied, tie_tails):
    cfg = from_dict(
        {
            "model": {
                "emb_size": 8,
                "hidden_size": 8,
                "tie_weights": tied,
                "softmax": "adaptive",
                "adaptive_cutoffs": [3, 5],
                "adaptive_div": 1 if tie_tails else 2,
                "adaptive_tie_tails": tie_tails,
                "init": "pytorch",
            }
        }
    )  # biases not 0
    vocab = Vocab(["<eos>", "<unk>"] + [f"w{i}" for i in range(8)])
    model = LanguageModel(cfg.model, len(vocab), seed=2)
    save_checkpoint(tmp_path / "a.npz", model.params, {"config": cfg.to_dict(), "vocab": vocab.to_dict()})
    again, _, cfg2 = model_from_checkpoint(load_checkpoint(tmp_path / "a.npz"))
    assert cfg2.model.adaptive_cutoffs == [3, 5] and list(again.params) == list(model.params)
    for name, p in model.params.items():
        np.testing.assert_array_equal(again.params[name], p)
    # docs/checkpoint-format.md's recipe, on the file's arrays, gives the model's log-probabilities
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        a = {k[len("param/") :]: z[k].astype(np.float64) for k in z.files if k.startswith("param/")}
    K, (c0, c1), V = 2, (3, 5), len(vocab)
    x = np.random.default_rng(3).standard_normal((4, 8))
    A = (
        np.concatenate([a["adaptive.head.cluster_weight"], a["embedding.weight"][:c0]]).T
        if tied
        else a["adaptive.head.weight"]
    )
    log_softmax = lambda z: z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # noqa: E731
    head = log_softmax(x @ A + a["adaptive.head.bias"])
    logp = np.empty((4, V))
    logp[:, :c0] = head[:, K:]
    for i, (lo, hi) in enumerate([(c0, c1), (c1, V)]):
        T = a["embedding.weight"][lo:hi].T if tie_tails else a[f"adaptive.tail.{i}.weight"]
        u = x if tie_tails else x @ a[f"adaptive.tail.{i}.proj"]
        z = u @ T + a[f"adaptive.tail.{i}.bias"]
        logp[:, lo:hi] = head[:, i : i + 1] + log_softmax(z)
    np.testing.assert_allclose(model.scores(x.astype(np.float32)), logp, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_from_before_the_adaptive_softmax_loads_as_full(tmp_path):
    cfg = from_dict({"model": {"emb_size": 4, "hidden_size": 4}})
    vocab = Vocab(["<eos>", "<unk>", "a", "b"])
    model = LanguageModel(cfg.model, len(vocab), seed=1)
    old = cfg.to_dict()
    for key in ("softmax", "adaptive_cutoffs", "adaptive_div"):
        del old["model"][key]
    save_checkpoint(tmp_path / "old.npz", model.params, {"config": old, "vocab": vocab.to_dict()})
    again, _, cfg2 = model_from_checkpoint(load_checkpoint(tmp_path / "old.npz"))
    assert cfg2.model.softmax == "full"
    np.testing.assert_array_equal(again.params["decoder.weight"], model.params["decoder.weight"])


@pytest.mark.parametrize("tie_tails", [False, True])
def test_fit_eval_generate_and_probe_on_an_adaptive_model(tiny_config, tmp_path, tie_tails):
    """A tied adaptive model (the names fall in the first tail cluster) trains, and every command reads it."""
    from tests.test_cli import lmtrain

    run = tmp_path / "run"
    tails = ["--set", "model.adaptive_div=1", "--set", "model.adaptive_tie_tails=true"] if tie_tails else []
    lmtrain(
        "fit",
        tiny_config,
        "--run-dir",
        run,
        "--quiet",
        "--set",
        "model.softmax=adaptive",
        "--set",
        "model.adaptive_cutoffs=[12,40]",
        "--set",
        "model.tie_weights=true",
        *tails,
        check=0,
    )
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if e["event"] == "train"]
    assert train[-1] < train[0] - 0.5, train  # from about log(72) = 4.3
    ckpt = run / "checkpoints" / "best.npz"
    out = json.loads(lmtrain("eval", "--ckpt", ckpt, "--json", check=0).stdout)
    assert out["ppl"] == pytest.approx(events[-1]["ppl"], rel=1e-9)
    lines = lmtrain(
        "generate",
        "--ckpt",
        ckpt,
        "--prompt",
        "mary said hi to",
        "--show-top",
        "3",
        "--greedy",
        "--max-tokens",
        "2",
        check=0,
    ).stdout.splitlines()
    assert lines[0] == "most likely next words:" and len(lines) == 5
    top = [float(line.split()[-1]) for line in lines[1:4]]
    assert top == sorted(top, reverse=True) and 0 < sum(top) <= 1.0001
    lmtrain(
        "generate",
        "--ckpt",
        ckpt,
        "--prompt",
        "the",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--max-tokens",
        "5",
        check=0,
    )
    recall = json.loads(
        lmtrain(
            "probe",
            "recall",
            "--ckpt",
            ckpt,
            "--distances",
            "1,3",
            "--stories",
            "20",
            "--plot",
            tmp_path / "r.png",
            "--json",
            check=0,
        ).stdout
    )
    accuracy = next(iter(recall["models"].values()))["accuracy"]
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)


def test_a_resumed_adaptive_run_logs_the_same_losses(tiny_config, tmp_path):
    """Tied, so the embedding rows past the head must be zeroed in every step's gradient, not carried."""
    from lmtrain.config import load_config
    from lmtrain.training import fit

    sets = ["model.softmax=adaptive", "model.adaptive_cutoffs=[12,40]", "model.tie_weights=true"]

    def losses(run):
        events = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(e["event"], e["step"], e["loss"]) for e in events if e["event"] in ("train", "valid", "test")]

    fit(load_config(tiny_config, sets), tmp_path / "whole", quiet=True)
    fit(load_config(tiny_config, sets + ["train.epochs=1"]), tmp_path / "part", quiet=True)
    fit(load_config(tiny_config, sets), tmp_path / "part", resume="last", quiet=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
