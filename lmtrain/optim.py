"""Optimizers, gradient clipping and learning-rate schedules.

Optimizers update parameter arrays in place from gradient arrays with the same
names.  Their state (momentum, Adam moments, step count) is a dict of named
arrays plus scalars so that checkpoints can store it without pickling.
"""
import math

from lmtrain.backend import xp


def grad_norm(store):
    """L2 norm of all gradients taken together (one pass over the gradient buffer)."""
    g = store.grad
    return math.sqrt(float(xp.dot(g, g)))


def clip_scale(norm, max_norm):
    """Factor that brings the global gradient norm down to ``max_norm`` (1 when it is under)."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)


class SGD:
    """p -= lr * g, with optional momentum and L2 weight decay, on the whole parameter buffer at once.

    ``step`` uses the gradient buffer as scratch space: read the gradients before it.
    """

    def __init__(self, store, momentum=0.0, weight_decay=0.0):
        self.store = store
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.velocity = xp.zeros_like(store.data) if momentum else None

    def step(self, lr, grad_scale=1.0):
        p, g = self.store.data, self.store.grad
        if grad_scale != 1.0:
            g *= g.dtype.type(grad_scale)
        if self.weight_decay:
            g += p.dtype.type(self.weight_decay) * p
        if self.momentum:
            v = self.velocity
            v *= v.dtype.type(self.momentum)
            v += g
            xp.multiply(v, v.dtype.type(lr), out=g)
        else:
            g *= g.dtype.type(lr)
        p -= g

    def state_dict(self):
        if self.velocity is None:
            return {"arrays": {}, "scalars": {}}
        return {"arrays": {f"velocity.{k}": v for k, v in self.store.views_of(self.velocity).items()},
                "scalars": {}}

    def load_state_dict(self, state):
        if self.velocity is not None:
            for k, v in self.store.views_of(self.velocity).items():
                v[...] = state["arrays"][f"velocity.{k}"]


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction and L2 weight decay, on the whole buffer at once."""

    def __init__(self, store, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.store = store
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = weight_decay
        self.m = xp.zeros_like(store.data)
        self.v = xp.zeros_like(store.data)
        self.tmp = xp.empty_like(store.data)
        self.t = 0

    def step(self, lr, grad_scale=1.0):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        p, g, m, v, tmp = self.store.data, self.store.grad, self.m, self.v, self.tmp
        f = p.dtype.type
        if grad_scale != 1.0:
            g *= f(grad_scale)
        if self.weight_decay:
            g += f(self.weight_decay) * p
        step_size = lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        v *= f(b2)
        xp.multiply(g, g, out=tmp)
        tmp *= f(1 - b2)
        v += tmp
        m *= f(b1)
        g *= f(1 - b1)
        m += g
        xp.sqrt(v, out=tmp)
        tmp += f(self.eps)
        xp.divide(m, tmp, out=tmp)
        tmp *= f(step_size)
        p -= tmp

    def state_dict(self):
        arrays = {f"m.{k}": a for k, a in self.store.views_of(self.m).items()}
        arrays.update({f"v.{k}": a for k, a in self.store.views_of(self.v).items()})
        return {"arrays": arrays, "scalars": {"t": self.t}}

    def load_state_dict(self, state):
        for k, a in self.store.views_of(self.m).items():
            a[...] = state["arrays"][f"m.{k}"]
        for k, a in self.store.views_of(self.v).items():
            a[...] = state["arrays"][f"v.{k}"]
        self.t = int(state["scalars"]["t"])


def make_optimizer(train_cfg, store):
    if train_cfg.optimizer == "sgd":
        return SGD(store, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    return Adam(store, beta1=train_cfg.beta1, beta2=train_cfg.beta2, eps=train_cfg.eps,
                weight_decay=train_cfg.weight_decay)


class LRSchedule:
    """Learning rate per epoch: constant, step decay, or decay on a validation plateau."""

    def __init__(self, train_cfg):
        self.kind = train_cfg.lr_schedule
        self.decay = train_cfg.lr_decay
        self.decay_start = train_cfg.lr_decay_start
        self.patience = train_cfg.plateau_patience
        self.lr = train_cfg.lr
        self.best = math.inf
        self.bad_epochs = 0

    def epoch_end(self, epoch, valid_ppl):
        """Called after each epoch's validation; returns the rate for the next epoch."""
        if self.kind == "step" and epoch >= self.decay_start:
            self.lr *= self.decay
        elif self.kind == "plateau":
            if valid_ppl < self.best:
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.patience:
                    self.lr *= self.decay
                    self.bad_epochs = 0
        self.best = min(self.best, valid_ppl)
        return self.lr

    def state_dict(self):
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.lr = state["lr"]
        self.best = state["best"]
        self.bad_epochs = state["bad_epochs"]
