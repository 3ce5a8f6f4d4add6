"""Training: a run's loop and the parts around it (see lmtrain/training/run.py)."""

from lmtrain.training.fit import fit
from lmtrain.training.run import Run
from lmtrain.training.step import train_step

__all__ = ["Run", "fit", "train_step"]
