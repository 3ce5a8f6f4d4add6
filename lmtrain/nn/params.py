"""One buffer for all parameters, one for all gradients, and named views into them.

Keeping every parameter in a single contiguous array lets the optimizer, the
gradient norm and clipping touch memory once per step instead of once per
array.  A *block* is a region of the buffers that one product reads as a
whole: the decoder's weight and bias sit side by side, so ``[x, 1] @ [W; b]``
computes ``x W + b`` in one pass and its gradient in one product.
"""

import math

import numpy as np

from lmtrain.backend import xp


class ParamStore:
    """The buffers of a Layout (lmtrain/nn/layout.py): ``params`` and ``grads`` name views into them,
    ``blocks`` maps a block's name to its (parameter, gradient) views."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.blocks = {}  # block name -> (param block, grad block)
        self.params = {}  # param name -> view into ``data``
        self.grads = {}  # param name -> view into ``grad``

    def build(self, layout):
        """Allocate the buffers (zeros) for ``layout``'s blocks, in its order; ``params`` follows the
        order of its parameters (the checkpoint's)."""
        total = sum(math.prod(shape) for _, shape in layout.blocks)
        self.data = xp.zeros(total, self.dtype)
        self.grad = xp.zeros(total, self.dtype)
        offsets, offset = {}, 0
        for name, shape in layout.blocks:
            offsets[name] = (offset, shape)
            self.blocks[name] = (self._block(self.data, offset, shape), self._block(self.grad, offset, shape))
            offset += math.prod(shape)
        self._where = {p.name: (*offsets[p.block], p.index) for p in layout.params}
        self.order = [p.name for p in layout.params]
        self.params = self.views_of(self.data)
        self.grads = self.views_of(self.grad)
        return self

    @staticmethod
    def _block(flat, offset, shape):
        return flat[offset : offset + math.prod(shape)].reshape(shape)

    def views_of(self, flat):
        """Named views into any buffer with this layout (parameters, gradients, optimizer state)."""
        return {name: self._block(flat, *self._where[name][:2])[self._where[name][2]] for name in self.order}
