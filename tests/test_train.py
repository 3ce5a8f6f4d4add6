import json
import math

import numpy as np
import pytest

from lmtrain.config import from_dict, load_config
from lmtrain.nn.layout import Layout, Param
from lmtrain.nn.params import ParamStore
from lmtrain.optim import SGD, Adam, LRSchedule, clip_scale, grad_norm
from lmtrain.training import fit
from lmtrain.training.streams import reset_streams


def quiet(*a, **k):
    pass


def test_training_lowers_the_loss(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=3"])
    result = fit(cfg, str(tmp_path / "run"), quiet=True)
    events = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if e["event"] == "train"]
    assert train[-1] < train[0] - 1.0
    # it learns the stories' structure, not only how often each word comes: well below a unigram model's
    from lmtrain.data.sources import load_corpus

    corpus = load_corpus(cfg.data, log=quiet)
    counts = np.bincount(corpus.train, minlength=len(corpus.vocab)) + 1.0
    unigram = np.exp(-np.log(counts / counts.sum())[corpus.test[1:]].mean())  # about 33 (72 words)
    assert result["test_ppl"] < unigram / 4


def test_max_steps_stops_early(tiny_config, tmp_path):
    result = fit(load_config(tiny_config, ["train.max_steps=3"]), str(tmp_path / "run"), quiet=True)
    assert result["steps"] == 3


def store_of(dtype="float64", **arrays):
    """A ParamStore holding the given parameter values, one block each."""
    shapes = {name: np.shape(value) for name, value in arrays.items()}
    layout = Layout(
        [(name, shape) for name, shape in shapes.items()],
        [Param(name, shape, name, np.s_[...], None) for name, shape in shapes.items()],
        {},
    )
    store = ParamStore(dtype).build(layout)
    for name, value in arrays.items():
        store.params[name][...] = value
    return store


def test_grad_norm_and_clip_scale():
    store = store_of(a=[0.0, 0.0], b=[[0.0]])
    store.grads["a"][...] = [3.0, 0.0]
    store.grads["b"][...] = [[4.0]]
    assert grad_norm(store) == pytest.approx(5.0)
    assert clip_scale(5.0, 1.0) == pytest.approx(0.2, rel=1e-5)
    assert clip_scale(5.0, 10.0) == 1.0 and clip_scale(5.0, None) == 1.0


def test_sgd_and_adam_steps():
    store = store_of(w=[1.0, -2.0], b=[[3.0]])
    store.grads["w"][...] = [0.5, 0.5]
    store.grads["b"][...] = [[1.0]]
    SGD(store).step(lr=2.0, grad_scale=0.5)  # clipping folded into the update
    assert np.allclose(store.params["w"], [0.5, -2.5]) and np.allclose(store.params["b"], [[2.0]])

    store = store_of(w=[1.0])
    adam = Adam(store)
    store.grads["w"][...] = [10.0]
    adam.step(lr=0.1)  # the first Adam step moves by lr whatever the gradient's scale
    assert store.params["w"][0] == pytest.approx(0.9, abs=1e-6)
    state = adam.state_dict()
    assert state["scalars"]["t"] == 1 and set(state["arrays"]) == {"m.w", "v.w"}
    again = Adam(store_of(w=[0.0]))
    again.load_state_dict(state)
    assert np.array_equal(again.m, adam.m) and again.t == 1

    store = store_of(w=[1.0])
    sgd = SGD(store, momentum=0.9)
    for _ in range(2):
        store.grads["w"][...] = [1.0]
        sgd.step(lr=0.1)
    assert store.params["w"][0] == pytest.approx(1.0 - 0.1 - 0.19)


def schedule(**train):
    return LRSchedule(from_dict({"train": train}).train)


def test_step_schedule_halves_after_the_start_epoch():
    s = schedule(lr=1.0, lr_schedule="step", lr_decay=0.5, lr_decay_start=4)
    lrs = [s.epoch_end(e, 100.0) for e in range(1, 8)]
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.25, 0.125, 0.0625]  # epoch 5 runs at 0.5, as Zaremba et al.


def test_plateau_schedule_waits_for_patience():
    s = schedule(lr=1.0, lr_schedule="plateau", lr_decay=0.1, plateau_patience=1)
    assert [s.epoch_end(e, p) for e, p in enumerate([10, 9, 9.5, 9.6, 8], 1)] == pytest.approx(
        [1.0, 1.0, 1.0, 0.1, 0.1]
    )
    assert schedule(lr=2.0).epoch_end(1, math.inf) == 2.0


def test_reset_streams_zeroes_only_selected_columns():
    state = [(np.ones((3, 2)), np.ones((3, 2)))]
    reset_streams(state, np.array([False, True, False]))
    assert state[0][0][:, 0].tolist() == [1, 0, 1] and state[0][1][1].tolist() == [0, 0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_accumulation_makes_the_same_updates(tiny_config, tmp_path, optimizer):
    """train.accumulate splits the streams into passes whose gradients are summed: the same update, in float64
    the same losses to rounding, whatever the split (with state resets and clipping in play)."""
    curves = []
    for n in (1, 2, 4):
        cfg = load_config(
            tiny_config,
            [
                f"train.accumulate={n}",
                "train.dtype=float64",
                f"train.optimizer={optimizer}",
                "train.state_reset_prob=0.2",
                "train.clip_grad_norm=0.3",
                "train.lr=0.5" if optimizer == "sgd" else "train.lr=0.01",
            ],
        )
        fit(cfg, str(tmp_path / f"n{n}"), quiet=True)
        events = [json.loads(l) for l in (tmp_path / f"n{n}" / "metrics.jsonl").read_text().splitlines()]
        curves.append([(e["event"], e["step"], e["loss"]) for e in events if e["loss"] is not None])
    for other in curves[1:]:
        assert [c[:2] for c in other] == [c[:2] for c in curves[0]]
        np.testing.assert_allclose([c[2] for c in other], [c[2] for c in curves[0]], rtol=1e-10)


def test_accumulation_must_divide_the_streams(tiny_config, tmp_path):
    from lmtrain.errors import LmtrainError

    with pytest.raises(LmtrainError, match="train.batch_size 4 must divide by the 1 rank times train.accumulate 3"):
        fit(load_config(tiny_config, ["train.accumulate=3"]), str(tmp_path / "run"), quiet=True)
