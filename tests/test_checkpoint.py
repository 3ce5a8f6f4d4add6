import json
import os

import numpy as np
import pytest

from lmtrain.build import model_from_checkpoint
from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.config import from_dict
from lmtrain.data.vocab import Vocab
from lmtrain.errors import CheckpointError
from lmtrain.nn.model import LanguageModel


@pytest.fixture
def saved(tmp_path):
    cfg = from_dict({"model": {"emb_size": 4, "hidden_size": 5, "num_layers": 2}})
    vocab = Vocab(["<eos>", "<unk>", "a", "b", "c"])
    model = LanguageModel(cfg.model, len(vocab), seed=1)
    path = tmp_path / "ck.npz"
    meta = {"config": cfg.to_dict(), "vocab": vocab.to_dict(), "epoch": 1, "step": 7, "metrics": {}}
    save_checkpoint(path, model.params, meta, {"optim": {"m.x": np.ones(3, np.float32)}})
    return path, model


def test_round_trip_and_plain_numpy_readability(saved):
    path, model = saved
    with np.load(path, allow_pickle=False) as z:  # readable without lmtrain
        meta = json.loads(str(z["meta"]))
        assert meta["gate_order"] == "f,i,o,g"
        assert z["param/rnn.1.weight_h"].shape == (5, 20)
    again, vocab, cfg = model_from_checkpoint(load_checkpoint(path))
    for name, p in model.params.items():
        assert np.array_equal(again.params[name], p)
    assert vocab.words[2] == "a" and cfg.model.num_layers == 2


def test_missing_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.npz")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, 0.9])
def test_truncated_file_is_refused(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    cut = int(keep * len(data)) if isinstance(keep, float) else keep
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="not a readable .npz|fails its SHA-256"):
        load_checkpoint(path)


def test_random_bytes_and_foreign_npz(tmp_path):
    (tmp_path / "junk.npz").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_checkpoint(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an lmtrain checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        load_checkpoint(tmp_path / "arr.npy")


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_object_is_refused_without_running_it(saved, tmp_path):
    path, _ = saved
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param/evil"] = np.array([Boom()], dtype=object)
    evil = tmp_path / "evil.npz"
    np.savez(evil, **arrays)
    with pytest.raises(CheckpointError, match="pickled object"):
        load_checkpoint(evil)
    assert not os.path.exists("PWNED")
    # the payload is live: a loader that allowed pickles would have run it
    with np.load(evil, allow_pickle=True) as z:
        z["param/evil"]
    assert os.path.exists("PWNED")


def test_tampered_array_fails_checksum(saved):
    path, _ = saved
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param/decoder.bias"] = arrays["param/decoder.bias"] + 1
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "model",
    [
        {"cell": "lstm"},
        {"cell": "gru", "num_layers": 2},
        {"cell": "rnn", "tie_weights": True, "emb_size": 100},
        {"softmax": "adaptive", "adaptive_cutoffs": [5, 9]},
        {"softmax": "adaptive", "adaptive_cutoffs": [5], "tie_weights": True, "emb_size": 100},
        {
            "softmax": "adaptive",
            "adaptive_cutoffs": [5, 9],
            "tie_weights": True,
            "emb_size": 100,
            "adaptive_div": 1,
            "adaptive_tie_tails": True,
        },
    ],
)
def test_every_parameter_is_documented_and_the_doc_is_in_step(model):
    """docs/checkpoint-format.md's parameter table is lmtrain/nn/layout.py's, and names every parameter."""
    from lmtrain.nn.layout import DOCS, doc_key, layout, table
    from tests.conftest import ROOT

    cfg = from_dict({"model": model}).model
    assert {doc_key(p.name) for p in layout(cfg, 20).params} <= set(DOCS)
    assert table() in (ROOT / "docs" / "checkpoint-format.md").read_text()
