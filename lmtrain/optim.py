"""Optimizers, gradient clipping and learning-rate schedules.

Optimizers update parameter arrays in place from gradient arrays with the same
names.  Their state (momentum, Adam moments, step count) is a dict of named
arrays plus scalars so that checkpoints can store it without pickling.
"""
import math

from lmtrain.backend import xp


def global_norm(grads):
    """L2 norm of all gradients taken together."""
    return math.sqrt(sum(float(xp.vdot(g.reshape(-1), g.reshape(-1))) for g in grads.values()))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients so their global norm is at most ``max_norm``; return the norm before."""
    norm = global_norm(grads)
    if max_norm is not None and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(scale)
    return norm


class SGD:
    def __init__(self, params, momentum=0.0, weight_decay=0.0):
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.velocity = {k: xp.zeros_like(p) for k, p in params.items()} if momentum else {}

    def step(self, params, grads, lr):
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g += p.dtype.type(self.weight_decay) * p
            if self.momentum:
                v = self.velocity[name]
                v *= v.dtype.type(self.momentum)
                v += g
                g = v
            p -= p.dtype.type(lr) * g

    def state_dict(self):
        return {"arrays": {f"velocity.{k}": v for k, v in self.velocity.items()}, "scalars": {}}

    def load_state_dict(self, state):
        for k, v in self.velocity.items():
            v[...] = state["arrays"][f"velocity.{k}"]


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction; weight decay as an L2 term."""

    def __init__(self, params, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = weight_decay
        self.m = {k: xp.zeros_like(p) for k, p in params.items()}
        self.v = {k: xp.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def step(self, params, grads, lr):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step_size = lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g += p.dtype.type(self.weight_decay) * p
            m, v = self.m[name], self.v[name]
            m *= m.dtype.type(b1)
            m += m.dtype.type(1 - b1) * g
            v *= v.dtype.type(b2)
            v += v.dtype.type(1 - b2) * (g * g)
            denom = xp.sqrt(v)
            denom += denom.dtype.type(self.eps)
            p -= p.dtype.type(step_size) * (m / denom)

    def state_dict(self):
        arrays = {f"m.{k}": a for k, a in self.m.items()}
        arrays.update({f"v.{k}": a for k, a in self.v.items()})
        return {"arrays": arrays, "scalars": {"t": self.t}}

    def load_state_dict(self, state):
        for k in self.m:
            self.m[k][...] = state["arrays"][f"m.{k}"]
            self.v[k][...] = state["arrays"][f"v.{k}"]
        self.t = int(state["scalars"]["t"])


def make_optimizer(train_cfg, params):
    if train_cfg.optimizer == "sgd":
        return SGD(params, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    return Adam(params, beta1=train_cfg.beta1, beta2=train_cfg.beta2, eps=train_cfg.eps,
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
