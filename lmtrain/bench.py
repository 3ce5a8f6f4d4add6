"""`lmtrain bench`: how fast a config trains, evaluates and generates on this machine, and against what limit.

Training is timed through ``train_step`` (lmtrain/training/step.py), the code `lmtrain fit` runs.
The *limit* of a training step is the time its matrix products alone take,
each computed by the fastest way this machine has for its shape (found in the
same process: products of one time step at batch 20 run far below the rate of
whole-window products, so each shape gets its own).  Training passes and
passes of their products alone are timed in alternation, and the percentage
of the limit reached is the median of the rounds' ratios, so that a change in
the machine's speed between the two does not show as a change in lmtrain's.
Every figure is a median over repeats after a warm-up.

Under ``mpiexec -n K`` every rank trains its share of the streams, as in
`lmtrain fit`: training and evaluation rates count the whole batch, a timing
is the slowest rank's, and the limit is that of one rank's products.  The
report adds the time of one Allreduce of the gradient buffer, the
communication in each step.
"""

import functools
import math
import os
import resource
import time

import numpy as np

from lmtrain import threads
from lmtrain.backend import xp
from lmtrain.build import build_model, build_optimizer
from lmtrain.data.batching import get_batch
from lmtrain.data.corpus import Corpus
from lmtrain.data.vocab import EOS, UNK, Vocab
from lmtrain.evaluation import feed, stream
from lmtrain.generate import pick
from lmtrain.nn.model import products
from lmtrain.training import train_step
from lmtrain.training.streams import Streams
from lmtrain.world import World


def flops(products):
    return sum(2 * m * k * n * count for _, m, k, n, count in products)


def _median_time(fn, repeats, number=1, world=World()):
    """Median over repeats of the slowest rank's time (every rank starts each repeat together)."""
    times = []
    for _ in range(repeats):
        world.barrier()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append(world.max([(time.perf_counter() - start) / number])[0])
    return float(np.median(times))


def product_ways(m, k, n, dtype, steps=0, fast=False):
    """Every way lmtrain could compute an (m, k) @ (k, n) product, as calls: each operand in C order or
    transposed, the result either as A B or as (B^T A^T)^T (lmtrain itself computes dA W_h^T the second
    way), and on the fast path (``fast``), for a time step's product in windows of ``steps`` steps, the step
    kernel where lmtrain uses it (lmtrain.fast.StepProducts), on rows padded as the forward pads them and on
    rows as they are."""
    rng = np.random.default_rng(0)
    ways = []
    for m_, k_, n_ in ((m, k, n), (n, k, m)):
        out = xp.empty((m_, n_), dtype)
        for a_t in (False, True):
            for b_t in (False, True):
                a = xp.asarray(rng.standard_normal((k_, m_) if a_t else (m_, k_)), dtype)
                b = xp.asarray(rng.standard_normal((n_, k_) if b_t else (k_, n_)), dtype)
                ways.append(functools.partial(xp.matmul, a.T if a_t else a, b.T if b_t else b, out=out))
    if fast and steps:
        from lmtrain.fast import StepProducts, kernels, padded_width

        if StepProducts.use_kernel(m, steps):
            for width in sorted({k, padded_width(k)}):
                x, wt = (xp.asarray(rng.standard_normal(shape), dtype) for shape in [(m, width), (n, width)])
                ways.append(functools.partial(kernels.matmul_t, x, wt, xp.empty((m, n), dtype)))
    return ways


def fastest_way(m, k, n, dtype, repeats=5, steps=0, fast=False):
    """(seconds, way): the fastest of ``product_ways`` and its time, the best of ``repeats`` timings of
    about 20 MFLOP of calls each."""
    number = max(1, int(2e7 / max(2 * m * k * n, 1)))
    best = (math.inf, None)
    for way in product_ways(m, k, n, dtype, steps, fast):
        way()
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(number):
                way()
            best = min(best, ((time.perf_counter() - start) / number, way), key=lambda pair: pair[0])
    return best


def synthetic_corpus(vocab_size, n_tokens, seed=0):
    """Random ids drawn from Zipf's law over the vocabulary, P(id r) ~ (r + 1)^-1.1, as word frequencies
    roughly go (the embedding gradient cares, and the adaptive softmax's clusters).  The law is cut at the
    vocabulary and renormalised: clipping an unbounded Zipf draw instead would pile the mass beyond the
    vocabulary (27% of all ids at 267,735 words) onto its last word."""
    rng = np.random.default_rng(seed)
    vocab = Vocab([EOS, UNK] + [f"w{i}" for i in range(vocab_size - 2)])
    cdf = np.cumsum(np.arange(1, vocab_size + 1, dtype=np.float64) ** -1.1)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n_tokens) * cdf[-1], side="right"), vocab_size - 1).astype(
        np.int32
    )
    return Corpus(vocab, ranks, ranks[: n_tokens // 10], ranks[: n_tokens // 10])


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


class Bench:
    """The config's model on synthetic ids; each method returns one median timing."""

    def __init__(self, cfg, vocab_size=10000, steps=10, world=World()):
        self.cfg, self.V, self.steps, self.world = cfg, vocab_size, steps, world
        t = cfg.train
        n_tokens = t.batch_size * (t.bptt * (steps + 2) + 2)
        self.corpus = synthetic_corpus(vocab_size, n_tokens)
        self.model = build_model(cfg.model, vocab_size, seed=cfg.seed, dtype=t.dtype, kernels=t.kernels)
        world.broadcast_array(self.model.store.data)  # as in a run: every rank starts from rank 0's parameters
        self.model.set_regularization(t.ar, t.tar)
        self.optimizer = build_optimizer(t, self.model)
        self.streams = Streams(self.corpus.train, t.batch_size, t.accumulate, self.model, world)
        self.local_batch = self.streams.hi - self.streams.lo

    def train_step(self, k):
        """Training window ``k`` through ``train_step`` (forward, backward, allreduce, clip, update)."""
        t = self.cfg.train
        x, y = self.streams.window(k * t.bptt, t.bptt)
        train_step(self.model, self.optimizer, self.streams, x, y, t.lr, t.clip_grad_norm, self.world)

    def train_pass(self):
        """``steps`` training windows."""
        for k in range(self.steps):
            self.train_step(k)

    def eval_pass(self):
        """The same windows, forward and loss only, state carried (what evaluation runs)."""
        t = self.cfg.train
        stream(self.model, self.streams.data[: self.steps * t.bptt + 1], t.bptt)

    def generate_pass(self, tokens=50, seed=0):
        """Batch 1, one token at a time: forward, softmax, sampling (what `lmtrain generate` does)."""
        model, rng = self.model, np.random.default_rng(seed)
        state = model.init_state(1)
        logits, state = feed(model, [1], state)
        for _ in range(tokens):
            logits, state = feed(model, [pick(logits, rng)], state)

    def tokens_per_pass(self):
        return self.steps * self.cfg.train.bptt * self.cfg.train.batch_size

    def train_against_limit(self, repeats=5):
        """Training and its limit, timed side by side: ``repeats`` rounds of one training pass and one
        pass of the same windows' matrix products alone, back to back, each product by its fastest way
        (``fastest_way``, found once before the first round).  A machine's speed can change by a quarter
        within seconds; both passes are timed alike, right after each other, so each round's ratio
        compares like with like, and the report takes the medians.

        Returns (tokens/s, seconds per window, limit seconds per window, limit over window, best), the
        first four medians over the rounds, ``best`` each product kind's fastest time (its best rate)."""
        self.train_pass()  # warm-up: buffers, BLAS threads
        fast = self.model.layers.name == "numba"
        ways = {
            kind: fastest_way(*kind[:3], self.model.dtype, steps=kind[3], fast=fast) for kind in self.product_kinds()
        }
        calls = [(ways[self.kind(name, m, k, n)][1], count) for name, m, k, n, count in self.products()]

        def products_pass():
            for _ in range(self.steps):
                for way, count in calls:
                    for _ in range(count):
                        way()

        windows, limits = [], []
        for _ in range(repeats):
            windows.append(_median_time(self.train_pass, 1, world=self.world) / self.steps)
            limits.append(_median_time(products_pass, 1, world=self.world) / self.steps)
        window, limit = float(np.median(windows)), float(np.median(limits))
        ratio = float(np.median(np.array(limits) / np.array(windows)))
        best = {kind: seconds for kind, (seconds, _) in ways.items()}
        return self.tokens_per_pass() / (window * self.steps), window, limit, ratio, best

    def named_layers(self):
        """(name, layer) in the order a window's forward runs them: the embedding, the dropouts around each
        recurrent layer (those with a rate), the decoder and the loss (under the adaptive softmax, the
        adaptive softmax, its own decoder)."""
        m = self.model
        cell = self.cfg.model.cell
        out = [("embedding", m.embedding)]
        for i, (drop, rnn) in enumerate(zip(m.dropouts, m.rnns)):
            out += [(f"dropout {i}", drop)] if drop.p > 0 else []
            out.append((f"{cell} {i}", rnn))
        out += [(f"dropout {len(m.rnns)}", m.dropouts[-1])] if m.dropouts[-1].p > 0 else []
        out += [("decoder", m.decoder)] if m.decoder is not None else []
        return out + [("adaptive softmax" if m.decoder is None else "softmax cross-entropy", m.loss_layer)]

    def layer_times(self, repeats=5):
        """Where a window's time goes: milliseconds per window of each layer's forward and backward in
        training, of its forward in evaluation, and of the rest of a training step (the gradient norm,
        clipping and the update: a training step's time less its layers'), each the median over
        ``repeats`` passes of ``steps`` windows.  Every call is timed through a wrapper set on the layer
        object for the passes and removed after them.  Returns {"train": {name: (forward, backward)},
        "eval": {name: forward}, "train_rest": ms, "train_window": ms, "eval_window": ms}."""
        layers, spent = self.named_layers(), {}

        def timed(key, fn):
            def call(*args, **kwargs):
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
                return out

            return call

        objects = [(name, layer, method) for name, layer in layers for method in ("forward", "backward")]
        objects.append(("window", self, "train_step"))
        per_pass, wrapped = [], []
        try:
            for name, obj, method in objects:
                setattr(obj, method, timed((name, method), getattr(obj, method)))
                wrapped.append((obj, method))
            for kind, run in (("train", self.train_pass), ("eval", self.eval_pass)):
                run()  # warm-up
                for _ in range(repeats):
                    spent.clear()
                    start = time.perf_counter()
                    run()
                    spent[("window", kind)] = time.perf_counter() - start
                    per_pass.append((kind, {k: 1000 * v / self.steps for k, v in spent.items()}))
        finally:
            for obj, method in wrapped:
                delattr(obj, method)  # the class's method again

        def median(kind, key):
            return float(np.median([p.get(key, 0.0) for k, p in per_pass if k == kind]))

        names = [name for name, _ in layers]
        train = {n: (median("train", (n, "forward")), median("train", (n, "backward"))) for n in names}
        rest = float(
            np.median(
                [
                    p[("window", "train_step")] - sum(v for (n, _), v in p.items() if n != "window")
                    for k, p in per_pass
                    if k == "train"
                ]
            )
        )
        return {
            "train": train,
            "eval": {n: median("eval", (n, "forward")) for n in names},
            "train_rest": rest,
            "train_window": median("train", ("window", "train")),
            "eval_window": median("eval", ("window", "eval")),
        }

    def eval_tokens_per_s(self, repeats=5):
        self.eval_pass()
        return self.tokens_per_pass() / _median_time(self.eval_pass, repeats, world=self.world)

    def allreduce_seconds(self, repeats=5):
        """One Allreduce of a buffer the size of the gradients (what every training step sends)."""
        buf = self.model.store.grad.copy()
        self.world.allreduce(buf)
        return _median_time(lambda: self.world.allreduce(buf), repeats, number=3, world=self.world)

    def generate_ms_per_token(self, tokens=50, repeats=5):
        self.generate_pass(tokens)
        return 1000 * _median_time(lambda: self.generate_pass(tokens), repeats) / tokens

    @functools.cached_property
    def tail_rows(self):
        """Under the adaptive softmax, the mean number of targets per window in each tail cluster, counted
        in the windows ``train_pass`` times (once per bench); None under the full softmax."""
        m = self.cfg.model
        if m.softmax != "adaptive":
            return None
        t, edges = self.cfg.train, m.adaptive_cutoffs + [self.V]
        targets = [get_batch(self.streams.data, k * t.bptt, t.bptt)[1] for k in range(self.steps)]
        return [float(np.mean([((y >= a) & (y < b)).sum() for y in targets])) for a, b in zip(edges, edges[1:])]

    def products(self, backward=True):
        """(name, m, k, n, count) of every matrix product of one window (``backward=False``: the forward's)."""
        t = self.cfg.train
        return products(self.model, self.local_batch, t.bptt, backward, self.tail_rows)

    def kind(self, name, m, k, n):
        """What a product's timing depends on: (m, k, n, steps of its window when it is a time step's product)."""
        return (m, k, n, self.cfg.train.bptt if name.endswith("(per step)") else 0)

    def product_kinds(self):
        return {self.kind(name, m, k, n) for name, m, k, n, _ in self.products()}

    def limit_seconds(self, seconds):
        """Per window, with ``seconds`` the time of each product kind: the matrix products of training and
        of evaluation (forward only).  Returns (training s, evaluation s, training FLOPs, rows)."""
        total = lambda ps: sum(seconds[self.kind(name, m, k, n)] * count for name, m, k, n, count in ps)  # noqa: E731
        products = self.products()
        rows = [
            {
                "product": name,
                "shape": [m, k, n],
                "count": count,
                "gflop_s": 2 * m * k * n / seconds[self.kind(name, m, k, n)] / 1e9,
            }
            for name, m, k, n, count in products
        ]
        return total(products), total(self.products(backward=False)), flops(products), rows


def run_bench(cfg, steps=10, repeats=5, vocab_size=10000, world=World(), layers=False):
    """The report `lmtrain bench` prints; ``layers`` adds each layer's share of a window (``layer_times``)."""
    b = Bench(cfg, vocab_size, steps, world)
    train_tps, step_s, limit_s, ratio, best = b.train_against_limit(repeats)
    eval_tps = b.eval_tokens_per_s(repeats)
    allreduce_s = b.allreduce_seconds(repeats)
    gen_ms = b.generate_ms_per_token(repeats=repeats)
    best_rates_s, eval_limit_s, step_flops, products = b.limit_seconds(best)
    t, B = cfg.train, b.local_batch
    return {
        "config": {
            "emb_size": cfg.model.emb_size,
            "hidden_size": cfg.model.hidden_size,
            "num_layers": cfg.model.num_layers,
            "dropout": cfg.model.dropout,
            "tie_weights": cfg.model.tie_weights,
            "vocab_size": vocab_size,
            "softmax": cfg.model.softmax,
            "adaptive_cutoffs": cfg.model.adaptive_cutoffs,
            "tail_rows": b.tail_rows,
            "batch_size": t.batch_size,
            "bptt": t.bptt,
            "optimizer": t.optimizer,
            "dtype": t.dtype,
            "kernels": b.model.layers.name,
        },
        "ranks": world.size,
        "repeats": repeats,
        "threads": {
            "blas": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "blas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default"),
            "elementwise": threads.NUM_THREADS,
        },
        "train_tokens_per_s": train_tps,
        "train_step_ms": 1000 * step_s,
        "train_gflop_s": world.size * step_flops / step_s / 1e9,
        "flops_per_token": step_flops / (B * t.bptt),
        "limit_step_ms": 1000 * limit_s,
        "limit_best_rates_ms": 1000 * best_rates_s,
        "percent_of_limit": 100 * ratio,
        "gradient_mb": b.model.store.grad.nbytes / 1e6,
        "allreduce_ms": 1000 * allreduce_s,
        "eval_tokens_per_s": eval_tps,
        "eval_limit_tokens_per_s": world.size * B * t.bptt / eval_limit_s,
        "generate_ms_per_token": gen_ms,
        "peak_rss_mb": peak_rss_mb(),
        "products": products,
        **({"layers": b.layer_times(repeats)} if layers else {}),
    }


def format_report(r):
    c = r["config"]
    lines = [
        f"model: emb {c['emb_size']}, {c['num_layers']} x {c['hidden_size']}, dropout {c['dropout']}, "
        f"tied {c['tie_weights']}, vocabulary {c['vocab_size']:,}; batch {c['batch_size']}, bptt {c['bptt']}, "
        f"{c['optimizer']}, {c['dtype']}; element-wise kernels: {c['kernels']}",
        *(
            [
                f"softmax     adaptive, cutoffs {c['adaptive_cutoffs']}; targets per window in each tail cluster: "
                + ", ".join(f"{n:.1f}" for n in c["tail_rows"])
            ]
            if c["softmax"] == "adaptive"
            else []
        ),
        f"training    {r['train_tokens_per_s']:>10,.0f} tokens/s   {r['train_step_ms']:.1f} ms per window, "
        f"{r['train_gflop_s']:.0f} GFLOP/s ({r['flops_per_token'] / 1e6:.1f} MFLOP per token)",
        f"limit       {r['limit_step_ms']:>10.1f} ms per window for its "
        f"{'rank' + chr(39) + 's ' if r['ranks'] > 1 else ''}matrix products alone: "
        f"{r['percent_of_limit']:.0f}% of the limit reached (median of {r['repeats']} rounds timing both; "
        f"each product at its shape's best rate: {r['limit_best_rates_ms']:.1f} ms)",
        f"evaluation  {r['eval_tokens_per_s']:>10,.0f} tokens/s   limit {r['eval_limit_tokens_per_s']:,.0f} tokens/s "
        f"(its forward products at their best measured rates)",
        *(
            [
                f"ranks       {r['ranks']:>10}   {c['batch_size'] // r['ranks']} streams each; one Allreduce of the "
                f"{r['gradient_mb']:.1f} MB gradient buffer takes {r['allreduce_ms']:.1f} ms"
            ]
            if r["ranks"] > 1
            else []
        ),
        f"generation  {r['generate_ms_per_token']:>10.2f} ms per token (batch 1)",
        f"peak RSS    {r['peak_rss_mb']:>10.0f} MB",
        "products of one training window (best rate measured for each shape):",
    ]
    for p in r["products"]:
        m, k, n = p["shape"]
        lines.append(f"  {p['product']:<30} ({m} x {k}) @ ({k} x {n}) x {p['count']:<3} {p['gflop_s']:7.1f} GFLOP/s")
    if "layers" in r:
        t = r["layers"]
        lines += [
            f"where a window's time goes (ms a window, medians of {r['repeats']} passes):",
            f"  {'':<24} {'training':>18} {'evaluation':>12}",
            f"  {'':<24} {'forward':>8} {'backward':>9} {'forward':>12}",
        ]
        lines += [
            f"  {name:<24} {fwd:>8.2f} {bwd:>9.2f} {t['eval'][name]:>12.2f}" for name, (fwd, bwd) in t["train"].items()
        ]
        lines += [
            f"  {'the rest of a step':<24} {t['train_rest']:>18.2f}   (gradient norm, clipping, update)",
            f"  {'whole window':<24} {t['train_window']:>18.2f} {t['eval_window']:>12.2f}",
        ]
    return "\n".join(lines)
