"""Building a model and its optimizer, on the path chosen once: the numpy reference or the fast kernels.

``path(setting)`` makes the choice (``train.kernels``, overridden by the environment variable
LMTRAIN_KERNELS): "numpy" is the reference (lmtrain/nn/, lmtrain/optim.py); "numba" is lmtrain/fast/,
the same classes with their element-wise work compiled; "auto" takes numba where it is installed.  A
process that never chooses numba never imports it.  Everything that builds a model (training,
evaluation, the probes, bench) builds it here, and ``model_from_checkpoint`` rebuilds the model a
checkpoint describes.
"""

import os
from typing import NamedTuple

from lmtrain.config import from_dict
from lmtrain.data.vocab import Vocab
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.nn.model import REFERENCE, LanguageModel
from lmtrain.optim import REFERENCE as REFERENCE_OPTIMIZERS
from lmtrain.optim import make_optimizer

CHOICES = ("auto", "numba", "numpy")


class Path(NamedTuple):
    """The classes a model and its optimizer are made of, and the path's name ("numpy" or "numba")."""

    name: str
    layers: object
    optimizers: object


NUMPY = Path("numpy", REFERENCE, REFERENCE_OPTIMIZERS)


def path(setting="auto"):
    """The Path ``setting`` (one of CHOICES) asks for; LMTRAIN_KERNELS, when set, overrides it."""
    env = os.environ.get("LMTRAIN_KERNELS")
    chosen = env or setting
    if chosen not in CHOICES:
        where = "LMTRAIN_KERNELS" if env else "train.kernels"
        raise ConfigError(f"{where} is {chosen!r}; choose one of {', '.join(CHOICES)}")
    if chosen == "numpy":
        return NUMPY
    try:
        return _fast()
    except ImportError as e:
        if chosen == "numba":
            raise ConfigError(
                f"the numba kernels were asked for but cannot be loaded ({e}): "
                "pip install -e '.[fast]', or set train.kernels to auto"
            ) from None
        return NUMPY


def _fast():
    from lmtrain import fast

    return Path("numba", fast.LAYERS, fast.OPTIMIZERS)


def build_model(model_cfg, vocab_size, seed=0, dtype="float32", kernels="auto"):
    """A fresh LanguageModel on the path ``kernels`` chooses."""
    return LanguageModel(model_cfg, vocab_size, seed=seed, dtype=dtype, layers=path(kernels).layers)


def build_optimizer(train_cfg, model):
    """The optimizer ``train_cfg`` asks for, on the model's path."""
    classes = NUMPY.optimizers if model.layers.name == "numpy" else _fast().optimizers
    return make_optimizer(train_cfg, model.store, classes)


def model_from_checkpoint(ckpt, dtype=None, kernels=None):
    """(model, vocab, config) rebuilt from a loaded checkpoint, with every shape checked.

    ``dtype`` overrides the stored one (the gradient probe works in float64); ``kernels`` the stored
    ``train.kernels`` ("numpy": the reference layers, which the gradient probe needs).
    """
    try:
        cfg = from_dict(ckpt.meta["config"])
        vocab = Vocab.from_dict(ckpt.meta["vocab"])
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{ckpt.path} has an invalid config or vocabulary: {err}") from None
    model = build_model(
        cfg.model, len(vocab), seed=cfg.seed, dtype=dtype or cfg.train.dtype, kernels=kernels or cfg.train.kernels
    )
    expected = model.params
    for name, value in ckpt.params.items():
        if name not in expected:
            raise CheckpointError(f"{ckpt.path} has parameter '{name}', which this model does not have")
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{ckpt.path}: parameter '{name}' has shape {value.shape}, expected "
                f"{expected[name].shape} (vocabulary of {len(vocab)} words)"
            )
    absent = [n for n in expected if n not in ckpt.params]
    if absent:
        raise CheckpointError(f"{ckpt.path} lacks parameter '{absent[0]}'")
    model.load_params(ckpt.params)
    return model, vocab, cfg
