"""Dropout variants, AR/TAR, NT-ASGD, AdamW, schedules, variable BPTT, time budgets, initialisation."""

import math

import numpy as np
import pytest

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import ModelConfig, from_dict, load_config
from lmtrain.nn.cells import Recurrent
from lmtrain.nn.layers import Dropout, Embedding
from lmtrain.nn.model import LanguageModel
from lmtrain.optim import Adam, AveragedSGD, LRSchedule
from lmtrain.training import fit
from tests.gradcheck import numerical_grad, rel_error
from tests.test_reliability import events
from tests.test_train import store_of


def test_locked_dropout_masks_are_constant_over_time_and_independent_across_the_batch():
    drop = Dropout(0.5, np.random.default_rng(0), locked=True)
    out = drop.forward(np.ones((30, 64, 40), np.float32), train=True)
    assert drop.mask.shape == (1, 64, 40)
    assert (out == out[0]).all()  # every time step of a stream sees the same mask
    # ...and streams differ: a mask shared across the batch is the classic bug
    assert not (out[:, 0] == out[:, 1]).all()
    assert 0.4 < (out[0] == 0).mean() < 0.6
    plain = Dropout(0.5, np.random.default_rng(0)).forward(np.ones((30, 64, 40), np.float32), train=True)
    assert not (plain == plain[0]).all()


def test_weight_drop_mask_is_fixed_within_a_pass_and_redrawn_between_passes():
    rng = np.random.default_rng(1)
    D, H, B, T = 3, 4, 2, 6
    layer = Recurrent(
        rng.standard_normal((D, 4 * H)),
        rng.standard_normal((H, 4 * H)),
        np.zeros(4 * H),
        weight_drop=0.5,
        rng=np.random.default_rng(2),
    )
    x = rng.standard_normal((T, B, D))
    state = (np.zeros((B, H)), np.zeros((B, H)))
    out, _ = layer.forward(x, state, train=True)
    first = layer.wmask.copy()
    assert set(np.unique(first)) == {0.0, 2.0}
    # The same outputs come from an LSTM whose W_h is fixed at W_h * mask for the whole window.
    fixed = Recurrent(layer.params["weight_x"], layer.params["weight_h"] * first, layer.params["bias"])
    np.testing.assert_allclose(fixed.forward(x, state)[0], out, rtol=1e-12)
    layer.forward(x, state, train=True)
    assert not np.array_equal(layer.wmask, first)
    layer.forward(x, state, train=False)
    assert layer.wmask is None


def test_embedding_dropout_removes_whole_words():
    rng = np.random.default_rng(3)
    emb = Embedding(rng.standard_normal((50, 8)), word_drop=0.5, rng=np.random.default_rng(4))
    ids = rng.integers(0, 50, size=(40, 5))
    out = emb.forward(ids, train=True)
    zero = (out == 0).all(axis=-1)
    for word in np.unique(ids):
        rows = zero[ids == word]
        assert rows.all() or not rows.any(), word  # every occurrence dropped, or none
    assert zero.any() and not zero.all()
    kept = ~zero
    np.testing.assert_allclose(out[kept], 2.0 * emb.params["weight"][ids[kept]])


@pytest.mark.parametrize("mode", ["element", "locked"])
def test_gradients_with_every_regulariser(mode):
    """Locked or element dropout at three rates, embedding dropout, weight drop, AR and TAR, tied, unequal layers."""
    cfg = ModelConfig(
        emb_size=5,
        hidden_size=7,
        last_hidden_size=5,
        num_layers=2,
        tie_weights=True,
        dropout_input=0.3,
        dropout_hidden=0.2,
        dropout_output=0.4,
        dropout_mode=mode,
        embedding_dropout=0.2,
        weight_drop=0.3,
        init="uniform",
        init_scale=0.4,
    )
    V, T, B = 11, 4, 3
    model = LanguageModel(cfg, V, seed=2, dtype="float64")
    model.set_regularization(ar=2.0, tar=1.0)
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, V, size=(T, B)), rng.integers(0, V, size=(T, B))
    state = [(rng.standard_normal((B, H)) * 0.1, rng.standard_normal((B, H)) * 0.1) for H in (7, 5)]
    model.forward(x, state, train=True)
    model.freeze_dropout()
    assert model.rnns[0].wmask is not None and model.embedding.word_mask is not None

    def objective():
        logits, _ = model.forward(x, state, train=True)
        return model.loss(logits, y).objective

    objective()
    assert model.reg_loss > 0
    model.backward()
    analytic = {k: g.copy() for k, g in model.grads.items()}
    for name, p in model.params.items():
        err = rel_error(analytic[name], numerical_grad(objective, p))
        assert err < 1e-6, (name, err)


def test_ar_and_tar_values():
    cfg = ModelConfig(emb_size=4, hidden_size=4, num_layers=1)
    model = LanguageModel(cfg, 9, seed=0, dtype="float64")
    model.set_regularization(ar=2.0, tar=3.0)
    x = np.arange(6).reshape(3, 2) % 9
    logits, _ = model.forward(x, model.init_state(2), train=True)
    h = model.h_last
    expected = 2.0 * np.mean(h**2) + 3.0 * np.mean((h[1:] - h[:-1]) ** 2)
    assert model.reg_loss == pytest.approx(expected)
    model.forward(x, model.init_state(2), train=False)
    assert model.reg_loss == 0.0  # evaluation measures the NLL alone


def test_ntasgd_switches_at_the_documented_condition_and_averages():
    store = store_of(w=[0.0])
    opt = AveragedSGD(store, nonmono=2)
    # switch when the loss is worse than the best of all checks but the last `nonmono`
    # 3.5 is not worse than min([5.0]) and 3.2 not worse than min([5.0, 4.0]): no switch yet
    assert [opt.observe_validation(v, e) for e, v in enumerate([5.0, 4.0, 3.0, 3.5, 3.2], 1)] == [None] * 5
    assert not opt.averaging
    assert opt.observe_validation(4.5, 6) == "validation stopped improving"  # worse than min([5.0, 4.0, 3.0])
    assert opt.averaging
    for target in [1.0, 2.0, 3.0]:  # steps that move w to 1, 2, 3
        store.grads["w"][...] = store.params["w"] - target
        opt.step(lr=1.0)
    assert store.params["w"][0] == 3.0
    with opt.averaged():  # running mean of the switch point (0) and the three steps
        assert store.params["w"][0] == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert store.params["w"][0] == 3.0


def test_ntasgd_run_evaluates_and_saves_the_averaged_weights(tmp_path, tiny_config):
    cfg = load_config(
        tiny_config,
        ["train.optimizer=ntasgd", "train.nonmono=1", "train.epochs=8", "train.lr=60", "train.clip_grad_norm=0.25"],
    )
    run = tmp_path / "run"
    fit(cfg, str(run), quiet=True)
    switches = [e for e in events(run) if e["event"] == "switch_to_averaging"]
    assert len(switches) == 1 and switches[0]["epoch"] < 8  # steps were averaged after it
    last = load_checkpoint(run / "checkpoints" / "last.npz")
    assert last.meta["optimizer"]["averaging"]
    raw = last.group("optim")
    assert any(not np.array_equal(last.params[k], raw[f"raw.{k}"]) for k in last.params)


def test_averaging_from_an_epoch_keeps_the_sgd_steps_and_evaluates_their_mean(tmp_path, tiny_config):
    opt = AveragedSGD(store_of(w=[0.0]), nonmono=None, average_from=2)
    assert opt.observe_validation(5.0, 1) is None
    assert opt.observe_validation(9.0, 2) == "epoch 2 ended" and opt.averaging  # by epoch, whatever the loss

    runs = {}
    for name, extra in [("plain", []), ("averaged", ["train.average_from=1"])]:
        cfg = load_config(tiny_config, ["train.optimizer=sgd", "train.lr=2", "train.epochs=3"] + extra)
        fit(cfg, str(tmp_path / name), quiet=True)
        logged = events(tmp_path / name)
        runs[name] = (
            [e["ppl"] for e in logged if e["event"] == "valid"],
            [e for e in logged if e["event"] == "switch_to_averaging"],
        )
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.npz")
    averaged = load_checkpoint(tmp_path / "averaged" / "checkpoints" / "last.npz")
    (plain_valid, none), (avg_valid, switches) = runs["plain"], runs["averaged"]
    assert none == [] and [(e["epoch"], e["reason"]) for e in switches] == [(1, "epoch 1 ended")]
    assert avg_valid[0] == plain_valid[0] and avg_valid[1:] != plain_valid[1:]  # the mean is evaluated
    raw = averaged.group("optim")
    for k in plain.params:  # the SGD steps are the plain run's to the bit; the checkpoint holds their mean
        np.testing.assert_array_equal(raw[f"raw.{k}"], plain.params[k])
    assert any(not np.array_equal(averaged.params[k], plain.params[k]) for k in plain.params)


@pytest.mark.parametrize("stop_at", [0.5, 1.5])  # inside the epoch before the switch, and after it
def test_a_run_resumed_while_averaging_ends_with_the_same_weights(tmp_path, tiny_config, stop_at):
    """The checkpoint holds the mean; the raw weights, the mean's count and the switch travel beside it.  A
    run stopped inside the epoch that ends in the switch has not switched yet."""
    sets = ["train.optimizer=sgd", "train.lr=2", "train.epochs=3", "train.average_from=1"]
    fit(load_config(tiny_config, sets), str(tmp_path / "whole"), quiet=True)
    per_epoch = next(e["step"] for e in events(tmp_path / "whole") if e["event"] == "switch_to_averaging")
    fit(
        load_config(tiny_config, sets + [f"train.max_steps={int(per_epoch * stop_at)}"]),
        str(tmp_path / "part"),
        quiet=True,
    )
    fit(load_config(tiny_config, sets), str(tmp_path / "part"), resume="last", quiet=True)
    whole, part = (load_checkpoint(tmp_path / run / "checkpoints" / "last.npz") for run in ("whole", "part"))
    for k in whole.params:
        np.testing.assert_array_equal(part.params[k], whole.params[k])
    assert [e["ppl"] for e in events(tmp_path / "part") if e["event"] == "test"] == [
        e["ppl"] for e in events(tmp_path / "whole") if e["event"] == "test"
    ]


@pytest.mark.parametrize("extra", [["train.optimizer=adam"], ["train.optimizer=sgd", "train.momentum=0.9"]])
def test_average_from_refuses_what_it_cannot_average(tiny_config, extra):
    from lmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="needs train.optimizer sgd or ntasgd and train.momentum 0"):
        load_config(tiny_config, ["train.average_from=1"] + extra)


def test_a_run_too_short_to_average_says_so(tmp_path, tiny_config):
    cfg = load_config(tiny_config, ["train.optimizer=sgd", "train.lr=2", "train.average_from=2"])  # 2 epochs
    said = []
    fit(cfg, str(tmp_path / "run"), echo=said.append)
    assert any("train.average_from 2 is not below train.epochs 2" in line for line in said)
    assert not any(e["event"] == "switch_to_averaging" for e in events(tmp_path / "run"))


def test_adamw_decays_outside_the_adaptive_step():
    store = store_of(w=[2.0])
    opt = Adam(store, weight_decay=0.1, decoupled=True)
    store.grads["w"][...] = [0.0]
    opt.step(lr=0.5)
    assert store.params["w"][0] == pytest.approx(2.0 * (1 - 0.5 * 0.1))  # zero gradient: decay only
    coupled = store_of(w=[2.0])
    Adam(coupled, weight_decay=0.1).step(lr=0.5)  # L2: the decay enters the adaptive step (moves by ~lr)
    assert coupled.params["w"][0] == pytest.approx(1.5, abs=1e-6)


def test_warmup_and_cosine():
    s = LRSchedule(from_dict({"train": {"lr": 1.0, "lr_schedule": "cosine", "min_lr": 0.1, "warmup_steps": 4}}).train)
    assert s.at(0, 0.0) == pytest.approx(0.25) and s.at(3, 0.0) == pytest.approx(1.0)
    assert s.at(10, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.at(10, 1.0) == pytest.approx(0.1)


def test_linear_schedule_falls_in_a_straight_line_to_min_lr():
    s = LRSchedule(from_dict({"train": {"lr": 1.0, "lr_schedule": "linear", "min_lr": 0.1}}).train)
    assert [s.at(k, p) for k, p in enumerate((0.0, 0.25, 0.5, 1.0, 1.5))] == pytest.approx([1.0, 0.775, 0.55, 0.1, 0.1])


def test_variable_bptt_scales_the_rate_by_the_window(tmp_path, tiny_config):
    cfg = load_config(
        tiny_config,
        [
            "train.variable_bptt=true",
            "train.bptt=12",
            "train.log_every=1",
            "train.optimizer=sgd",
            "train.lr=1.0",
            "train.epochs=1",
        ],
    )
    fit(cfg, str(tmp_path / "run"), quiet=True)
    lrs = [e["lr"] for e in events(tmp_path / "run") if e["event"] == "train"]
    assert len(set(lrs)) > 3  # window lengths differ, and so do the rates
    lengths = np.array(lrs) * 12
    assert np.allclose(lengths, np.round(lengths)) and lengths.min() >= 5 and lengths.max() <= 32


def test_time_budget_ends_training_evaluated_and_saved(tmp_path, tiny_config):
    cfg = load_config(tiny_config, ["train.epochs=1000", "train.time_budget=0.15"])
    run = tmp_path / "run"
    result = fit(cfg, str(run), quiet=True)
    logged = events(run)
    assert [e["event"] for e in logged if e["event"] == "time_budget"] == ["time_budget"]
    assert logged[-1]["event"] == "test" and math.isfinite(result["test_ppl"])
    assert result["elapsed_s"] <= 0.15 * 60 + 1.0
    assert (run / "checkpoints" / "best.npz").exists()


def test_budget_running_out_during_a_validation_is_reported(tmp_path, tiny_config, monkeypatch):
    """The budget can run out while an epoch's closing validation runs; the run still says why it stopped."""
    import lmtrain.training.run as run_module

    real_evaluate = run_module.evaluate

    def evaluate_then_out_of_time(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        monkeypatch.setattr(run_module.TimeBudget, "elapsed", lambda self: 1e9)
        return result

    monkeypatch.setattr(run_module, "evaluate", evaluate_then_out_of_time)
    cfg = load_config(tiny_config, ["train.epochs=3", "train.time_budget=10"])
    fit(cfg, str(tmp_path / "run"), quiet=True)
    names = [e["event"] for e in events(tmp_path / "run")]
    assert names.count("valid") == 1 and names.count("time_budget") == 1
    assert names[-1] == "test"


def test_orthogonal_recurrent_init():
    cfg = ModelConfig(emb_size=6, hidden_size=8, orthogonal_recurrent=True)
    W = LanguageModel(cfg, 10, dtype="float64").params["rnn.0.weight_h"]
    for k in range(4):
        block = W[:, 8 * k : 8 * (k + 1)]
        np.testing.assert_allclose(block.T @ block, np.eye(8), atol=1e-12)


def test_tying_with_a_different_last_layer():
    cfg = from_dict(
        {"model": {"emb_size": 5, "hidden_size": 9, "last_hidden_size": 5, "num_layers": 3, "tie_weights": True}}
    )
    model = LanguageModel(cfg.model, 12)
    assert model.params["rnn.2.weight_h"].shape == (5, 20) and model.params["rnn.1.weight_x"].shape == (9, 36)
    assert "decoder.weight" not in model.params
