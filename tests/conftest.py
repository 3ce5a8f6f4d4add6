import importlib
import os
from pathlib import Path

import pytest

import lmtrain  # noqa: F401  before numpy, as the CLI imports it: it sets how OpenBLAS's idle threads wait

ROOT = Path(__file__).resolve().parents[1]


def ptb_dir():
    """The verified Penn Treebank, where $LMTRAIN_PTB_DIR says (CI sets it); None when absent."""
    env = os.environ.get("LMTRAIN_PTB_DIR")
    path = Path(env) if env else None
    return path if path is not None and (path / "train.txt").is_file() else None


def needs(name, found, what):
    """Skip the calling test module unless ``found``; where $LMTRAIN_REQUIRE lists ``name`` (CI sets
    ``torch,mpi4py``), fail instead: an independent reference must not vanish from CI unnoticed because its
    install failed."""
    if found:
        return
    if name in os.environ.get("LMTRAIN_REQUIRE", "").split(","):
        pytest.fail(f"{name} is required here (LMTRAIN_REQUIRE) but missing: {what}", pytrace=False)
    pytest.skip(f"{name} missing: {what}", allow_module_level=True)


def optional(module, what):
    """Import an optional extra for a test module (see ``needs``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        needs(module, False, what)


@pytest.fixture
def on_path(monkeypatch):
    """``on_path(name)`` chooses the path, "numpy" (the reference) or "numba" (lmtrain/fast/), for the rest of
    the test: it returns the path's classes (``lmtrain.build.Path``), and the runs the test starts take it too
    (through LMTRAIN_KERNELS)."""
    from lmtrain import build

    def choose(name):
        monkeypatch.setenv("LMTRAIN_KERNELS", name)
        return build.path(name)

    return choose


@pytest.fixture(params=["numpy", "numba"])
def each_path(request, on_path):
    """Run the test on the numpy reference and on the fused kernels (numba, the fast extra) in turn; the
    path's classes (``lmtrain.build.Path``)."""
    if request.param == "numba":
        optional("numba", "pip install -e '.[fast]'")  # inside a fixture: skips (or fails) this test alone
    return on_path(request.param)


@pytest.fixture
def ptb():
    """The Penn Treebank's directory; its tests skip without it, except where LMTRAIN_REQUIRE lists "ptb"
    (CI does: a test that silently skips there checks nothing)."""
    path = ptb_dir()
    needs("ptb", path is not None, "the Penn Treebank was not found (set LMTRAIN_PTB_DIR)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own directory, so runs/ and data/cache never leak between tests."""
    monkeypatch.chdir(tmp_path)


TINY = """\
data:
  source: synthetic
  lowercase: true
  synthetic: {train_stories: 300, valid_stories: 30, test_stories: 30, max_distance: 4}
model: {emb_size: 16, hidden_size: 16, num_layers: 1}
train: {batch_size: 4, bptt: 10, epochs: 2, optimizer: adam, lr: 0.01, clip_grad_norm: 1.0, eval_batch_size: 3,
        log_every: 5}
seed: 3
"""


@pytest.fixture
def tiny_config(tmp_path):
    """A config that trains in about a second."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path
