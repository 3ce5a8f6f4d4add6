"""Fixed-seed loss curves that every later version of the code must reproduce.

`python -m tests.reference_curves` writes tests/reference/*.json; the files in
the repository were written by commit e61c730, before the speed work of
issue 4, and tests/test_speed_preserves_results.py compares the current code
against them.
"""

import json
import os
import tempfile

from lmtrain.config import from_dict
from lmtrain.training import fit

CURVES = {
    # config S's shape on the built-in corpus: untied, no dropout, SGD with clipping
    "small-untied-sgd": {
        "data": {
            "source": "synthetic",
            "synthetic": {"train_stories": 800, "valid_stories": 40, "test_stories": 40, "max_distance": 8},
        },
        "model": {"emb_size": 32, "hidden_size": 32, "num_layers": 1, "init": "uniform"},
        "train": {
            "batch_size": 20,
            "bptt": 35,
            "epochs": 2,
            "optimizer": "sgd",
            "lr": 5.0,
            "clip_grad_norm": 0.25,
            "log_every": 1,
            "eval_batch_size": 10,
        },
        "seed": 5,
    },
    # config M's shape: two layers, dropout, tied weights, SGD with clipping, step decay
    "medium-tied-dropout": {
        "data": {
            "source": "synthetic",
            "synthetic": {"train_stories": 800, "valid_stories": 40, "test_stories": 40, "max_distance": 8},
        },
        "model": {"emb_size": 48, "hidden_size": 48, "num_layers": 2, "dropout": 0.5, "tie_weights": True},
        "train": {
            "batch_size": 20,
            "bptt": 35,
            "epochs": 2,
            "optimizer": "sgd",
            "lr": 5.0,
            "clip_grad_norm": 0.25,
            "lr_schedule": "step",
            "lr_decay_start": 1,
            "log_every": 1,
            "eval_batch_size": 10,
        },
        "seed": 6,
    },
    # Adam, forget bias, state resets
    "adam-resets": {
        "data": {
            "source": "synthetic",
            "synthetic": {"train_stories": 500, "valid_stories": 40, "test_stories": 40, "max_distance": 8},
        },
        "model": {"emb_size": 24, "hidden_size": 40, "num_layers": 1, "init": "pytorch", "forget_bias": 1.0},
        "train": {
            "batch_size": 16,
            "bptt": 20,
            "epochs": 1,
            "optimizer": "adam",
            "lr": 0.003,
            "clip_grad_norm": 1.0,
            "state_reset_prob": 0.2,
            "log_every": 1,
            "eval_batch_size": 8,
        },
        "seed": 7,
    },
}


def curve(name):
    """Every logged event's (event, step, loss) of a fixed-seed run."""
    cfg = from_dict(CURVES[name])
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            fit(cfg, "run", quiet=True)
            with open("run/metrics.jsonl") as fh:
                events = [json.loads(line) for line in fh]
        finally:
            os.chdir(cwd)
    return [[e["event"], e["step"], e["loss"]] for e in events if e["loss"] is not None]


if __name__ == "__main__":
    here = os.path.join(os.path.dirname(__file__), "reference")
    for name in CURVES:
        with open(os.path.join(here, f"{name}.json"), "w") as fh:
            json.dump(curve(name), fh)
        print("wrote", name)
