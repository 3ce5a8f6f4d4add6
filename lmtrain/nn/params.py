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
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._blocks = []   # (block name, shape, {param name: index into the block})
        self.blocks = {}    # block name -> (param block, grad block)
        self.params = {}    # param name -> view into ``data``
        self.grads = {}     # param name -> view into ``grad``

    def block(self, name, shape, views):
        """Declare a block; ``views`` names the parameters it holds, e.g. {"decoder.bias": np.s_[-1]}."""
        self._blocks.append((name, tuple(shape), views))

    def build(self, order):
        """Allocate the buffers (zeros); ``order`` fixes the order of ``params`` (the checkpoint's)."""
        total = sum(math.prod(shape) for _, shape, _ in self._blocks)
        self.data = xp.zeros(total, self.dtype)
        self.grad = xp.zeros(total, self.dtype)
        self._where = {}   # param name -> (offset, block shape, index)
        offset = 0
        for name, shape, named in self._blocks:
            self.blocks[name] = (self._block(self.data, offset, shape), self._block(self.grad, offset, shape))
            for pname, index in named.items():
                self._where[pname] = (offset, shape, index)
            offset += math.prod(shape)
        self.order = list(order)
        self.params = self.views_of(self.data)
        self.grads = self.views_of(self.grad)
        return self

    @staticmethod
    def _block(flat, offset, shape):
        return flat[offset:offset + math.prod(shape)].reshape(shape)

    def views_of(self, flat):
        """Named views into any buffer with this layout (parameters, gradients, optimizer state)."""
        return {name: self._block(flat, *self._where[name][:2])[self._where[name][2]] for name in self.order}
