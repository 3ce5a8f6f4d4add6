"""Optimizers, gradient clipping and learning-rate schedules.

Optimizers update the whole parameter buffer in place from the gradient
buffer (lmtrain/nn/params.py), a slice at a time (``update``), the slices in
threads.  Their state (momentum, Adam moments, step count) is a dict of named
arrays plus scalars so that checkpoints can store it without pickling.  This
is the reference; lmtrain/fast/ has the same optimizers with each slice's
update one compiled loop.
"""

import contextlib
import math
from typing import NamedTuple

from lmtrain.backend import xp
from lmtrain.threads import parallel_rows


def grad_norm(store):
    """L2 norm of all gradients taken together (one pass over the gradient buffer)."""
    g = store.grad
    return math.sqrt(float(xp.dot(g, g)))


def clip_scale(norm, max_norm):
    """Factor that brings the global gradient norm down to ``max_norm`` (1 when it is under)."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)


class Optimizer:
    """What every optimizer offers besides ``step``: by default, evaluation uses the weights as they are."""

    @contextlib.contextmanager
    def averaged(self):
        """Inside: the parameters are the ones evaluation and checkpoints should use."""
        yield

    def observe_validation(self, loss, epochs_done):
        """Called after each validation (``epochs_done``: whole epochs trained by then); returns why the
        optimizer changed its regime, or None."""
        return None


class SGD(Optimizer):
    """p -= lr * g, with optional momentum and L2 weight decay, on the whole parameter buffer at once.

    ``step`` uses the gradient buffer as scratch space: read the gradients before it.
    """

    def __init__(self, store, momentum=0.0, weight_decay=0.0):
        self.store = store
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.velocity = xp.zeros_like(store.data) if momentum else None

    def step(self, lr, grad_scale=1.0):
        """One update with learning rate ``lr`` from the gradients times ``grad_scale`` (the clipping
        factor, folded in here so that clipping costs no pass of its own)."""
        parallel_rows(lambda a, b: self.update(a, b, lr, grad_scale), self.store.data.size, 1)

    def update(self, a, b, lr, grad_scale):
        """The update of the slice [a, b) of the buffers."""
        pa, ga = self.store.data[a:b], self.store.grad[a:b]
        f = pa.dtype.type
        scale = grad_scale
        if (self.weight_decay or self.momentum) and scale != 1.0:
            ga *= f(scale)  # both need the clipped gradient itself; plain SGD folds it into lr below
            scale = 1.0
        if self.weight_decay:
            ga += f(self.weight_decay) * pa
        if self.momentum:
            va = self.velocity[a:b]
            va *= f(self.momentum)
            va += ga
            xp.multiply(va, f(lr), out=ga)
        else:
            ga *= f(lr * scale)
        pa -= ga

    def state_dict(self):
        if self.velocity is None:
            return {"arrays": {}, "scalars": {}}
        return {"arrays": {f"velocity.{k}": v for k, v in self.store.views_of(self.velocity).items()}, "scalars": {}}

    def load_state_dict(self, state):
        if self.velocity is not None:
            for k, v in self.store.views_of(self.velocity).items():
                v[...] = state["arrays"][f"velocity.{k}"]


class AveragedSGD(SGD):
    """Plain SGD that switches to averaged SGD (Polyak and Juditsky 1992): from the switch on it also
    keeps the running mean of the parameters after every step, and evaluation and checkpoints use
    that mean.  The SGD steps themselves are the same as without it.

    The switch comes when a validation loss is worse than the best of all checks but the last
    ``nonmono`` (non-monotonically triggered, NT-ASGD: Merity et al. 2017), or at the end of epoch
    ``average_from``, whichever is first; either may be None (never).
    """

    def __init__(self, store, nonmono=5, average_from=None, weight_decay=0.0):
        super().__init__(store, momentum=0.0, weight_decay=weight_decay)
        self.nonmono = nonmono
        self.average_from = average_from
        self.history = []
        self.averaging = False
        self.avg = None
        self.n_avg = 0

    def step(self, lr, grad_scale=1.0):
        super().step(lr, grad_scale)
        if self.averaging:
            self.n_avg += 1
            p, g, avg = self.store.data, self.store.grad, self.avg
            k = g.dtype.type(1.0 / self.n_avg)

            def average(a, b):  # avg += (p - avg) / n, with the gradient buffer as scratch
                xp.subtract(p[a:b], avg[a:b], out=g[a:b])
                g[a:b] *= k
                avg[a:b] += g[a:b]

            parallel_rows(average, p.size, 1)

    def observe_validation(self, loss, epochs_done):
        reason = None
        if not self.averaging:
            if (
                self.nonmono is not None
                and len(self.history) > self.nonmono
                and loss > min(self.history[: -self.nonmono])
            ):
                reason = "validation stopped improving"
            elif self.average_from is not None and epochs_done >= self.average_from:
                reason = f"epoch {epochs_done} ended"
        self.history.append(loss)
        if reason:
            self.averaging = True
            self.avg = self.store.data.copy()
            self.n_avg = 1
        return reason

    @contextlib.contextmanager
    def averaged(self):
        if not self.averaging:
            yield
            return
        p = self.store.data
        raw = p.copy()
        p[...] = self.avg
        try:
            yield
        finally:
            p[...] = raw

    def state_dict(self):
        """The raw (not averaged) weights travel here; the checkpoint's parameters are the averaged ones."""
        # copies: the caller saves them while the averaged weights occupy the parameter buffer
        raw = self.store.views_of(self.store.data.copy()) if self.averaging else {}
        arrays = {f"raw.{k}": v for k, v in raw.items()}
        return {
            "arrays": arrays,
            "scalars": {"history": self.history, "averaging": self.averaging, "n_avg": self.n_avg},
        }

    def load_state_dict(self, state):
        """Call after the checkpoint's (averaged) parameters were loaded into the model."""
        sc = state["scalars"]
        self.history, self.averaging, self.n_avg = list(sc["history"]), sc["averaging"], sc["n_avg"]
        if self.averaging:
            self.avg = self.store.data.copy()
            for k, v in self.store.views_of(self.store.data).items():
                v[...] = state["arrays"][f"raw.{k}"]


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction, on the whole buffer at once.

    ``weight_decay`` is an L2 term added to the gradient, or with
    ``decoupled=True`` (AdamW, Loshchilov & Hutter 2019) a shrinking of the
    weights by lr * weight_decay outside the adaptive update.
    """

    def __init__(self, store, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
        self.store = store
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self.m = xp.zeros_like(store.data)
        self.v = xp.zeros_like(store.data)
        self.tmp = xp.empty_like(store.data)
        self.t = 0

    def step(self, lr, grad_scale=1.0):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step_size = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        parallel_rows(lambda a, b: self.update(a, b, lr, grad_scale, step_size), self.store.data.size, 1)

    def update(self, a, b, lr, grad_scale, step_size):
        """The update of the slice [a, b) of the buffers, with the bias correction folded into ``step_size``."""
        p, g, m, v, tmp = (x[a:b] for x in (self.store.data, self.store.grad, self.m, self.v, self.tmp))
        f, b1, b2 = p.dtype.type, self.beta1, self.beta2
        if grad_scale != 1.0:
            g *= f(grad_scale)
        if self.weight_decay and self.decoupled:
            p *= f(1.0 - lr * self.weight_decay)
        elif self.weight_decay:
            g += f(self.weight_decay) * p
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


def averaging_start(train_cfg):
    """``train.average_from`` where the run has an epoch after it to average, else None."""
    start = train_cfg.average_from
    return start if start is not None and start < train_cfg.epochs else None


class Optimizers(NamedTuple):
    """The optimizer classes ``make_optimizer`` picks from (lmtrain.fast has the fused kernels' versions)."""

    SGD: type
    AveragedSGD: type
    Adam: type


REFERENCE = Optimizers(SGD, AveragedSGD, Adam)


def make_optimizer(train_cfg, store, classes=REFERENCE):
    t = train_cfg
    average_from = averaging_start(t)
    if t.optimizer == "sgd" and average_from is None:
        return classes.SGD(store, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer in ("sgd", "ntasgd"):
        return classes.AveragedSGD(
            store,
            nonmono=t.nonmono if t.optimizer == "ntasgd" else None,
            average_from=average_from,
            weight_decay=t.weight_decay,
        )
    return classes.Adam(
        store, beta1=t.beta1, beta2=t.beta2, eps=t.eps, weight_decay=t.weight_decay, decoupled=t.optimizer == "adamw"
    )


# The fraction of (lr - min_lr) left when a fraction p of the run is done.  The straight line spends less
# of the run than the half cosine at rates too small to move the weights.
ANNEAL = {"cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)), "linear": lambda p: 1.0 - p}


class LRSchedule:
    """The learning rate: a base rate per epoch (constant, step decay, decay on a validation plateau),
    shaped per step by linear warm-up and, for ``cosine`` and ``linear``, a half cosine or a straight
    line from lr to min_lr over the run."""

    def __init__(self, train_cfg):
        self.kind = train_cfg.lr_schedule
        self.decay = train_cfg.lr_decay
        self.decay_start = train_cfg.lr_decay_start
        self.patience = train_cfg.plateau_patience
        self.warmup = train_cfg.warmup_steps
        self.min_lr = train_cfg.min_lr
        self.lr = train_cfg.lr
        self.best = math.inf
        self.bad_epochs = 0

    def at(self, step, progress):
        """Rate for optimizer step ``step`` (0-based) when ``progress`` (0..1) of the run is done."""
        lr = self.lr
        if self.kind in ANNEAL:
            lr = self.min_lr + (lr - self.min_lr) * ANNEAL[self.kind](min(max(progress, 0.0), 1.0))
        if self.warmup and step < self.warmup:
            lr *= (step + 1) / self.warmup
        return lr

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
        return {"arrays": {}, "scalars": {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs}}

    def load_state_dict(self, state):
        sc = state["scalars"]
        self.lr, self.best, self.bad_epochs = sc["lr"], sc["best"], sc["bad_epochs"]
