"""Evaluation-time adaptation: the neural cache and dynamic evaluation.

Both read a split as one stream (batch 1), the state carried from the first
token to the last, and score every target once, before anything has seen it.

Neural cache (Grave, Joulin & Usunier 2017).  After reading w_1..w_t the
model's top layer outputs h_t and predicts w_{t+1}.  The cache holds the
pairs (h_j, w_{j+1}) of the last ``window`` steps j < t, whose next word is
already known, and gives word w the probability

    p_cache(w) = sum_{j : w_{j+1} = w} exp(theta h_t . h_j)  /  sum_j exp(theta h_t . h_j)

which is mixed with the model's:  p(w) = (1 - lambda) p_model(w) + lambda p_cache(w).
The cache starts empty (the first target is scored by the model alone) and
grows to ``window`` pairs.  Only the target's probability is needed, and its
log is written as the model's plus a gain,

    log p(target) = log p_model(target) + [logaddexp(log(1 - lambda) + log p_model(target),
                                                     log lambda + log p_cache(target)) - log p_model(target)]

so the model's loss is summed exactly as plain evaluation sums it, and
lambda = 0 adds exactly 0.

Dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018, the RMS rule
with decay).  The split is cut into segments of ``segment`` tokens; each is
scored first, then the model takes one gradient step on that segment's mean
loss, so no word is scored by weights that have seen it:

    theta <- theta - lr * g / (sqrt(MS) + eps) + decay_i (theta_0 - theta)
    decay_i = min(1, decay * sqrt(MS_i) / mean(sqrt(MS)))

MS is the mean square of each parameter's gradient over the training split
(``gradient_stats``, one pass, cached beside the checkpoint under its
checksum); theta_0 are the trained weights, towards which every step pulls
back.  lr = 0 leaves the weights untouched and the result is plain
evaluation's, to the bit.  The gradients are the model's own backward, the
one the gradient checks test.
"""

import glob
import math
import os
import time
import zipfile
import zlib

import numpy as np
from tqdm import tqdm

from lmtrain.backend import to_numpy, xp
from lmtrain.data.batching import batchify
from lmtrain.errors import LmtrainError
from lmtrain.evaluation import perplexity, stream
from lmtrain.files import atomic_write
from lmtrain.nn.adaptive import log_softmax
from lmtrain.threads import parallel_rows

DYN_EPS = 1e-4  # added to sqrt(MS): a parameter that training hardly moved must not take huge steps here
UPDATE_BLOCK = 1 << 16  # parameters per block of DynamicEval.update: its 5 arrays stay in L2 (docs/performance.md)
STATS_BATCH = 64  # streams read at once by the statistics pass (their number sets MS's scale, which lr absorbs)


class NeuralCache:
    """The cache of one stream: the last ``window`` (hidden state, next word) pairs."""

    def __init__(self, window, theta):
        self.window, self.theta = int(window), float(theta)
        self.keys = None  # (M, d) float64, M <= window
        self.words = np.zeros(0, np.int64)  # (M,)

    def weights(self, h, targets):
        """Cache weights of the window's rows: (T, M + T) over the stored pairs followed by the window's
        own, each row a distribution over the pairs it may see (the ``window`` latest before it), or all
        zero where the cache is still empty.  Then the pairs are updated.  Returns (weights, words)."""
        h = np.asarray(h, np.float64)  # the caller owns h: score_stream copies it out of the model's buffer
        keys = h if self.keys is None else np.concatenate([self.keys, h])
        words = np.concatenate([self.words, np.asarray(targets, np.int64)])
        T, M = len(h), len(keys) - len(h)
        scores = self.theta * (h @ keys.T)
        # row t (the stream's position M + t) sees the pairs j with M + t - window <= j < M + t
        j, t = np.arange(M + T)[None, :], M + np.arange(T)[:, None]
        seen = (j < t) & (j >= t - self.window)
        scores[~seen] = -np.inf
        top = scores.max(axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0.0
        w = np.exp(scores - top)
        total = w.sum(axis=1, keepdims=True)
        w /= np.where(total > 0, total, 1.0)
        self.keys, self.words = keys[-self.window :], words[-self.window :]
        return w, words

    def target_probs(self, h, targets):
        """(p_cache of each target, whether the row's cache held anything)."""
        w, words = self.weights(h, targets)
        return (w * (words[None, :] == np.asarray(targets)[:, None])).sum(axis=1), w.any(axis=1)


def distribution(w, words, vocab_size):
    """(T, V) cache distributions from ``NeuralCache.weights``: each row sums to 1 (or 0 while empty)."""
    T = len(w)
    flat = (np.arange(T)[:, None] * vocab_size + words[None, :]).ravel()
    return np.bincount(flat, weights=w.ravel(), minlength=T * vocab_size).reshape(T, vocab_size)


def mixture_gain(p_cache, nonempty, target_logp, lam):
    """log p(target) - log p_model(target) of the mixture, per row (0 where the cache is empty); in log
    space, so a target the model gives almost no probability stays finite, and lambda = 0 gives 0 exactly."""
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log1p(-lam) + target_logp, np.log(lam) + np.log(p_cache))
    return np.where(nonempty, mixed - target_logp, 0.0)


class DynamicEval:
    """Adapts the model's parameters, in place, after each scored segment (the module docstring's rule)."""

    def __init__(self, model, ms, lr, decay):
        store = model.store
        self.store, self.lr = store, float(lr)
        self.theta0 = store.data.copy()
        rms = xp.sqrt(xp.asarray(ms, dtype=np.float64))
        self.step_scale = xp.asarray(self.lr / (rms + DYN_EPS), dtype=store.dtype)
        self.decay = xp.asarray(np.minimum(1.0, float(decay) * rms / float(rms.mean())), dtype=store.dtype)

    def update(self):
        """One step from the gradients in the store (its gradient buffer is used as scratch): in blocks
        small enough to stay in cache, so the four passes cost about one pass over memory."""
        p, g, scale, decay, theta0 = self.store.data, self.store.grad, self.step_scale, self.decay, self.theta0

        def update(a, b):
            for lo in range(a, b, UPDATE_BLOCK):
                hi = min(lo + UPDATE_BLOCK, b)
                gb, pb = g[lo:hi], p[lo:hi]
                gb *= scale[lo:hi]
                pb -= gb
                xp.subtract(theta0[lo:hi], pb, out=gb)
                gb *= decay[lo:hi]
                pb += gb

        parallel_rows(update, p.size, 1)

    def restore(self):
        self.store.data[...] = self.theta0


def stats_path(ckpt_path, sha):
    root = os.path.splitext(os.fspath(ckpt_path))[0]
    return f"{root}.dynstats-{sha[:12]}.npz"


def read_stats(path, sha, shape):
    """The statistics cached at ``path`` for the checkpoint whose checksum is ``sha``, or None where the file
    is not a whole cache of them (truncated, damaged, of another checkpoint): then they are computed again."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ms = z["ms"]
            if str(z["sha256"]) == sha and ms.shape == shape and ms.dtype == np.float64 and np.isfinite(ms).all():
                return ms
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError):
        pass
    return None


def gradient_stats(model, train_ids, bptt, ckpt_path=None, sha=None, progress=True, echo=print):
    """Mean square of every parameter's gradient over one pass of the training split (``STATS_BATCH``
    streams, windows of ``bptt``, dropout off), read from the file cached beside the checkpoint when its
    checksum matches, else computed and written there."""
    path = stats_path(ckpt_path, sha) if ckpt_path and sha else None
    if path and os.path.exists(path):
        cached = read_stats(path, sha, model.store.grad.shape)
        if cached is not None:
            return cached
        echo(f"note: {path} is damaged or stale; computing the gradient statistics again")
    data = batchify(train_ids, STATS_BATCH)
    if len(data) < 2:
        raise LmtrainError("the training split is too short to collect dynamic evaluation's gradient statistics")
    ms = np.zeros(model.store.grad.shape, np.float64)
    windows = 0

    def add_square(window):
        nonlocal windows
        model.backward()
        g = to_numpy(model.store.grad).astype(np.float64)
        ms[...] += g * g
        windows += 1

    stream(
        model,
        data,
        bptt,
        on_window=add_square,
        grad=True,
        progress=lambda starts: tqdm(
            starts, desc="gradient statistics (train)", disable=not progress, leave=False, unit="win"
        ),
    )
    ms /= windows
    if path:
        try:
            atomic_write(path, lambda fh: np.savez(fh, ms=ms, sha256=np.str_(sha)))
        except OSError as err:
            echo(
                f"warning: could not cache the gradient statistics at {path} ({err.strerror}); "
                "they will be computed again next time"
            )
            return ms
        for stale in glob.glob(glob.escape(os.path.splitext(os.fspath(ckpt_path))[0]) + ".dynstats-*.npz"):
            if stale != path:  # statistics of an earlier version of this checkpoint
                os.remove(stale)
        echo(f"dynamic evaluation: gradient statistics written to {path}")
    return ms


def cache_gains(cache, h, targets, target_logp, lambdas):
    """{lambda: summed log-gain of the mixture} over one window's rows, the cache then holding them."""
    p_cache, nonempty = cache.target_probs(h, targets)
    return {lam: float(mixture_gain(p_cache, nonempty, target_logp, lam).sum()) for lam in lambdas}


def score_stream(model, ids, window, cache=None, dynamic=None, lambdas=(), collect=False, progress=True, desc="eval"):
    """One pass over ``ids`` at batch 1, in windows of ``window`` tokens.

    Returns (loss sum, targets, {lambda: summed cache gain}, collected): the loss summed as
    ``evaluation.evaluate`` sums it at batch 1 with the same windows; with ``collect``, ``collected`` is
    (top-layer outputs, targets, log p_model(target)) of every position, for replaying caches.
    """
    gains = {lam: 0.0 for lam in lambdas}
    kept = []

    def after_window(window):
        if cache is not None or collect:
            targets = window.y[:, 0].astype(np.int64)
            scores = to_numpy(model.scores(window.out)).astype(np.float64)
            logp = log_softmax(scores)[np.arange(len(targets)), targets]
            h = np.array(to_numpy(model.h_last[:, 0]))  # a copy: the model's buffer is reused next window
            if collect:
                kept.append((h, targets, logp))
            if cache is not None:
                for lam, g in cache_gains(cache, h, targets, logp, lambdas).items():
                    gains[lam] += g
        if dynamic is not None:
            model.backward()
            dynamic.update()

    try:
        total, count = stream(
            model,
            np.asarray(ids).reshape(-1, 1),
            window,
            on_window=after_window,
            grad=dynamic is not None,
            adapts=dynamic is not None,
            progress=lambda starts: tqdm(starts, desc=desc, disable=not progress, leave=False, unit="win"),
        )
    finally:
        if dynamic is not None:
            dynamic.restore()
    collected = tuple(np.concatenate(parts) for parts in zip(*kept)) if collect else None
    return total, count, gains, collected


def run(model, ids, window, cache_settings=None, dyn_settings=None, ms=None, progress=True):
    """Base, cache, dynamic and (when both are asked for) combined perplexity of ``ids``.

    ``cache_settings``: dict(window, theta, lam) or None; ``dyn_settings``: dict(lr, decay) or None.
    One pass without adaptation gives the base and the cache; one with it gives dynamic evaluation and
    the combination.  Returns {method: {"ppl", "loss", "seconds"}}.
    """
    results = {}

    def cache():
        if cache_settings is None:
            return None, ()
        return NeuralCache(cache_settings["window"], cache_settings["theta"]), (cache_settings["lam"],)

    t0 = time.perf_counter()
    c, lams = cache()
    total, count, gains, _ = score_stream(
        model, ids, window, cache=c, lambdas=lams, progress=progress, desc="base" + (" + cache" if c else "")
    )
    seconds = time.perf_counter() - t0
    results["base"] = dict(loss=total / count, seconds=seconds)
    if c is not None:
        results["cache"] = dict(loss=(total - gains[lams[0]]) / count, seconds=seconds)
    if dyn_settings is not None:
        t0 = time.perf_counter()
        c, lams = cache()
        dyn = DynamicEval(model, ms, dyn_settings["lr"], dyn_settings["decay"])
        total, count, gains, _ = score_stream(
            model,
            ids,
            window,
            cache=c,
            dynamic=dyn,
            lambdas=lams,
            progress=progress,
            desc="dynamic" + (" + cache" if c else ""),
        )
        seconds = time.perf_counter() - t0
        results["dynamic"] = dict(loss=total / count, seconds=seconds)
        if c is not None:
            results["dynamic+cache"] = dict(loss=(total - gains[lams[0]]) / count, seconds=seconds)
    for r in results.values():
        r["ppl"] = perplexity(r["loss"])
        r["tokens"] = int(count)
    return results


# -- tuning, on the validation split only --------------------------------------------------------------
CACHE_GRID = dict(window=(100, 500, 1000, 2000), theta=(0.1, 0.2, 0.3, 0.5, 0.8, 1.2), lam=(0.05, 0.1, 0.15, 0.2, 0.3))
DYN_LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
DYN_DECAYS = (0.0, 0.003, 0.01, 0.03)
DYN_REFINE = (0.5, 2.0)  # the grid's steps are ~3x: then half and twice the best rate, then the best decay


def by_ppl(row):
    """Sort key of the tuners: perplexity, with a setting that diverged (NaN or inf) last.  NaN compares
    false with everything, so without this it could come out first."""
    return row["ppl"] if math.isfinite(row["ppl"]) else math.inf


def beyond_edge(values, x, axis):
    """The next value of a sorted grid axis past ``x`` when ``x`` is its first or last value (one step of
    the ratio of the two outer values; 3, the default grids' step, where the inner one is 0, as a decay
    of 0 is), else None.  An axis of one value is fixed; λ stays below 1."""
    if len(values) < 2 or values[0] < x < values[-1]:
        return None
    if x == values[-1]:
        nxt = x * (values[-1] / values[-2] if values[-2] > 0 else 3.0)
    else:
        nxt = x * values[0] / values[1]
    nxt = float(f"{nxt:.6g}")
    if axis == "window":
        nxt = max(1, round(nxt))
    elif axis == "lam" and nxt >= 1.0:
        nxt = (x + 1.0) / 2.0
    return None if nxt in values else nxt


def grow_at_edges(best, axes, extend, try_setting):
    """While the best setting so far (``best()``) lies on an edge of one of ``axes`` ({name: sorted values
    tried}), try one step past it along that axis, the other settings where they are
    (``try_setting(setting, axis)``), at most ``extend`` steps an axis: a grid too narrow for the model
    cannot hand back its own boundary."""
    grown = dict.fromkeys(axes, 0)
    while True:
        b = best()
        for axis in axes:
            value = beyond_edge(axes[axis], b[axis], axis) if grown[axis] < extend else None
            if value is not None:
                break
        else:
            return
        axes[axis] = sorted(axes[axis] + [value])
        grown[axis] += 1
        try_setting({**b, axis: value}, axis)


def tune_cache(model, ids, window, grid=CACHE_GRID, extend=4, progress=True):
    """Every (window, theta, lambda) of ``grid`` on ``ids``: one model pass, then each cache replayed over
    its stored outputs, and past a winning edge (``grow_at_edges``).  Returns (rows sorted best first, base
    perplexity)."""
    total, count, _, (h, targets, logp) = score_stream(
        model, ids, window, collect=True, progress=progress, desc="validation pass"
    )
    rows = {}

    def replay(n, theta, lams):
        cache, gains = NeuralCache(n, theta), dict.fromkeys(lams, 0.0)
        for a in range(0, len(targets), window):
            for lam, g in cache_gains(
                cache, h[a : a + window], targets[a : a + window], logp[a : a + window], lams
            ).items():
                gains[lam] += g
        for lam, g in gains.items():
            rows[n, theta, lam] = dict(window=n, theta=theta, lam=lam, ppl=perplexity((total - g) / count))

    axes = {k: sorted(v) for k, v in grid.items()}
    settings = [(n, th) for n in axes["window"] for th in axes["theta"]]
    for n, theta in tqdm(settings, desc="cache settings", disable=not progress, leave=False):
        replay(n, theta, axes["lam"])
    grow_at_edges(
        lambda: min(rows.values(), key=by_ppl),
        axes,
        extend,
        lambda s, axis: replay(s["window"], s["theta"], [s["lam"]] if axis == "lam" else axes["lam"]),
    )
    return sorted(rows.values(), key=by_ppl), perplexity(total / count)


def tune_dynamic(model, ids, segment, ms, lrs=DYN_LRS, decays=DYN_DECAYS, refine=DYN_REFINE, extend=4, progress=True):
    """A coordinate search: every learning rate at the middle decay, every decay at the best rate, then
    the best rate times each factor of ``refine`` at the best decay, and last the best decay times each
    factor at the best rate so far (the decays, too, are ~3x apart); then past a winning edge of the rates
    or decays tried (``grow_at_edges``).  Returns (rows sorted best first, base perplexity)."""

    def trial(lr, decay):
        total, count, _, _ = score_stream(
            model,
            ids,
            segment,
            dynamic=DynamicEval(model, ms, lr, decay),
            progress=progress,
            desc=f"dynamic lr {lr:g} decay {decay:g}",
        )
        return dict(lr=lr, decay=decay, ppl=perplexity(total / count))

    total, count, _, _ = score_stream(model, ids, segment, progress=progress, desc="validation pass")
    middle = decays[len(decays) // 2]
    rows = [trial(lr, middle) for lr in lrs]
    best_lr = min(rows, key=by_ppl)["lr"]
    rows += [trial(best_lr, d) for d in decays if d != middle]
    best_decay = min(rows, key=by_ppl)["decay"]
    rows += [trial(best_lr * f, best_decay) for f in refine]
    best = min(rows, key=by_ppl)
    if best["decay"] > 0:
        rows += [trial(best["lr"], best["decay"] * f) for f in refine]
    axes = {axis: sorted({r[axis] for r in rows}) for axis in ("lr", "decay")}
    grow_at_edges(lambda: min(rows, key=by_ppl), axes, extend, lambda s, axis: rows.append(trial(s["lr"], s["decay"])))
    return sorted(rows, key=by_ppl), perplexity(total / count)
