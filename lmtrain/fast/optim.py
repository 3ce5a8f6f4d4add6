"""The fast path's optimizers: the reference's (lmtrain/optim.py), each slice's update one compiled loop
(``kernels.sgd_update``, ``kernels.adam_update``) instead of a chain of numpy calls."""

from lmtrain import optim
from lmtrain.fast import kernels as k


class SGD(optim.SGD):
    def update(self, a, b, lr, grad_scale):
        if self.weight_decay or self.momentum:  # no kernel for these: the reference's update
            return super().update(a, b, lr, grad_scale)
        p = self.store.data
        k.sgd_update(p[a:b], self.store.grad[a:b], p.dtype.type(lr * grad_scale))


class AveragedSGD(SGD, optim.AveragedSGD):
    """Averaged SGD whose SGD steps are the kernel's."""


class Adam(optim.Adam):
    def update(self, a, b, lr, grad_scale, step_size):
        f = self.store.data.dtype.type  # the scalars in the buffers' type: a Python float would make it float64
        decoupled = self.decoupled and self.weight_decay
        consts = [
            f(c)
            for c in (
                grad_scale,
                0.0 if decoupled else self.weight_decay,
                1.0 - lr * self.weight_decay if decoupled else 1.0,
                self.beta1,
                1 - self.beta1,
                self.beta2,
                1 - self.beta2,
                self.eps,
                step_size,
            )
        ]
        k.adam_update(*(x[a:b] for x in (self.store.data, self.store.grad, self.m, self.v)), *consts)


OPTIMIZERS = optim.Optimizers(SGD, AveragedSGD, Adam)
