"""The fast path: the reference layers and optimizers with their element-wise work in compiled kernels
(numba, the optional ``fast`` extra).

``LAYERS`` and ``OPTIMIZERS`` are the classes a model and its optimizer are built from when the kernels
are in use (``lmtrain.build`` chooses once); each computes what its reference class in lmtrain/nn/ or
lmtrain/optim.py computes, and tests/test_kernels.py holds one to the other.  Importing this package
imports numba.
"""

from lmtrain import threads
from lmtrain.fast import kernels
from lmtrain.fast.layers import Embedding, Recurrent, SoftmaxCrossEntropy, StepProducts, padded_width
from lmtrain.fast.optim import OPTIMIZERS
from lmtrain.nn.adaptive import AdaptiveSoftmax
from lmtrain.nn.layers import Dropout, Linear
from lmtrain.nn.model import Layers

LAYERS = Layers("numba", Embedding, Dropout, Linear, Recurrent, SoftmaxCrossEntropy, AdaptiveSoftmax)

threads.on_change(kernels.set_threads)  # the kernels that split themselves follow lmtrain's thread count

__all__ = ["LAYERS", "OPTIMIZERS", "StepProducts", "kernels", "padded_width"]
