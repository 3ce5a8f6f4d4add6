"""`lmtrain bench`: how fast a config trains, evaluates and generates on this machine, and against what limit.

Training is timed through ``Trainer.train_step``, the code `lmtrain fit` runs.
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
import tempfile
import time

import numpy as np

from lmtrain.backend import kernels_in_use, xp
from lmtrain.data.batching import get_batch
from lmtrain.data.corpus import Corpus
from lmtrain.data.vocab import EOS, UNK, Vocab
from lmtrain.generate import _feed, pick
from lmtrain.nn.adaptive import tail_shapes
from lmtrain.nn.cells import CELLS, StepProducts, padded_width
from lmtrain.nn.model import layer_sizes
from lmtrain.train import Trainer
from lmtrain.world import World


def training_products(model_cfg, V, B, T, backward=True, tail_rows=None):
    """(name, m, k, n, count): every matrix product of one training window; with ``backward=False``
    only the forward pass's (what evaluation runs).  Under the adaptive softmax ``tail_rows`` gives
    the rows (targets) each tail cluster receives per window: its products have that many rows."""
    E, N = model_cfg.emb_size, T * B
    sizes = layer_sizes(model_cfg)
    G = CELLS[model_cfg.cell].gates
    out = []
    for layer, H in enumerate(sizes):
        D = E if layer == 0 else sizes[layer - 1]
        out += [(f"rnn.{layer} x W_x (window)", N, D, G * H, 1),
                (f"rnn.{layer} h W_h (per step)", B, H, G * H, T)]
        if backward:
            out += [(f"rnn.{layer} dA W_h^T (per step)", B, G * H, H, T),
                    (f"rnn.{layer} dW_x (window)", D, N, G * H, 1),
                    (f"rnn.{layer} dW_h (window)", H, N, G * H, 1),
                    (f"rnn.{layer} dA W_x^T (window)", N, G * H, D, 1)]
    H = sizes[-1]
    if model_cfg.softmax == "adaptive":
        return out + adaptive_products(model_cfg, H, V, N, backward, tail_rows)
    out += [("decoder [h, 1] W (window)", N, H + 1, V, 1)]
    if backward:
        out += [("decoder dW (window)", H + 1, N, V, 1) if not model_cfg.tie_weights else
                ("decoder dW (window)", V, N, H + 1, 1),
                ("decoder dlogits W^T (window)", N, V, H, 1)]
    return out


def adaptive_products(model_cfg, H, V, N, backward, tail_rows):
    """The adaptive softmax's products (lmtrain/nn/adaptive.py): the head on all N rows, each tail
    cluster's projection and output on its rows only (none when it gets none)."""
    width = len(model_cfg.adaptive_cutoffs) + model_cfg.adaptive_cutoffs[0]
    out = [("head [h, 1] A (window)", N, H + 1, width, 1)]
    if backward:
        out += [("head dA (window)", H + 1, N, width, 1) if not model_cfg.tie_weights else
                ("head dA (window)", width, N, H + 1, 1),
                ("head ds A^T (window)", N, width, H, 1)]
    for i, ((d, words), n) in enumerate(zip(tail_shapes(H, V, model_cfg.adaptive_cutoffs, model_cfg.adaptive_div),
                                            tail_rows)):
        n = max(1, round(n)) if n > 0 else 0
        if not n:
            continue
        if model_cfg.adaptive_tie_tails:  # no projection; T_i is embedding rows, as the tied decoder
            out += [(f"tail {i} [h, 1] T (its rows)", n, H + 1, words, 1)]
            if backward:
                out += [(f"tail {i} dT (its rows)", words, n, H + 1, 1), (f"tail {i} dz T^T (its rows)", n, words, H, 1)]
            continue
        out += [(f"tail {i} h P (its rows)", n, H, d, 1), (f"tail {i} [u, 1] T (its rows)", n, d + 1, words, 1)]
        if backward:
            out += [(f"tail {i} dT (its rows)", d + 1, n, words, 1), (f"tail {i} dz T^T (its rows)", n, words, d, 1),
                    (f"tail {i} dP (its rows)", H, n, d, 1), (f"tail {i} du P^T (its rows)", n, d, H, 1)]
    return out


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


def product_ways(m, k, n, dtype, steps=0):
    """Every way lmtrain could compute an (m, k) @ (k, n) product, as calls: each operand in C order or
    transposed, the result either as A B or as (B^T A^T)^T (lmtrain itself computes dA W_h^T the second
    way), and for a time step's product in windows of ``steps`` steps the step kernel where lmtrain uses
    it (cells.StepProducts), on rows padded as the forward pads them and on rows as they are."""
    rng = np.random.default_rng(0)
    ways = []
    for (m_, k_, n_) in ((m, k, n), (n, k, m)):
        out = xp.empty((m_, n_), dtype)
        for a_t in (False, True):
            for b_t in (False, True):
                a = xp.asarray(rng.standard_normal((k_, m_) if a_t else (m_, k_)), dtype)
                b = xp.asarray(rng.standard_normal((n_, k_) if b_t else (k_, n_)), dtype)
                ways.append(functools.partial(xp.matmul, a.T if a_t else a, b.T if b_t else b, out=out))
    kernel = StepProducts.kernel_for(m, steps) if steps else None
    if kernel is not None:
        for width in sorted({k, padded_width(k)}):
            x, wt = (xp.asarray(rng.standard_normal(shape), dtype) for shape in [(m, width), (n, width)])
            ways.append(functools.partial(kernel.matmul_t, x, wt, xp.empty((m, n), dtype)))
    return ways


def fastest_way(m, k, n, dtype, repeats=5, steps=0):
    """(seconds, way): the fastest of ``product_ways`` and its time, the best of ``repeats`` timings of
    about 20 MFLOP of calls each."""
    number = max(1, int(2e7 / max(2 * m * k * n, 1)))
    best = (math.inf, None)
    for way in product_ways(m, k, n, dtype, steps):
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
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n_tokens) * cdf[-1], side="right"),
                       vocab_size - 1).astype(np.int32)
    return Corpus(vocab, ranks, ranks[:n_tokens // 10], ranks[:n_tokens // 10])


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


class Bench:
    """The config's model on synthetic ids; each method returns one median timing."""

    def __init__(self, cfg, vocab_size=10000, steps=10, world=World()):
        self.cfg, self.V, self.steps, self.world = cfg, vocab_size, steps, world
        t = cfg.train
        n_tokens = t.batch_size * (t.bptt * (steps + 2) + 2)
        self.corpus = synthetic_corpus(vocab_size, n_tokens)
        self.tmp = tempfile.TemporaryDirectory()
        self.trainer = Trainer(cfg, self.tmp.name, self.corpus, world=world, quiet=True)
        self.model = self.trainer.model
        self.local_batch = self.trainer.hi - self.trainer.lo

    def train_pass(self):
        """``steps`` training windows through Trainer.train_step (forward, backward, clip, update)."""
        t, tr = self.cfg.train, self.trainer
        for k in range(self.steps):
            tr.train_step(*get_batch(tr.train_data, k * t.bptt, t.bptt), t.lr)

    def eval_pass(self):
        """The same windows, forward and loss only, state carried (what evaluation runs)."""
        t, model = self.cfg.train, self.model
        state = model.init_state(self.local_batch)
        for k in range(self.steps):
            x, y = get_batch(self.trainer.train_data, k * t.bptt, t.bptt)
            logits, state = model.forward(xp.asarray(x), state, train=False, same_weights=k > 0)
            model.loss(logits, xp.asarray(y), grad=False)

    def generate_pass(self, tokens=50, seed=0):
        """Batch 1, one token at a time: forward, softmax, sampling (what `lmtrain generate` does)."""
        model, rng = self.model, np.random.default_rng(seed)
        state = model.init_state(1)
        logits, state = _feed(model, [1], state)
        for _ in range(tokens):
            logits, state = _feed(model, [pick(logits, rng)], state)

    def tokens_per_pass(self):
        return self.steps * self.cfg.train.bptt * self.cfg.train.batch_size

    def train_against_limit(self, repeats=5):
        """Training and its limit, timed side by side: ``repeats`` rounds of one training pass and one
        pass of the same windows' matrix products alone, back to back, each product by its fastest way
        (``fastest_way``, found once before the first round).  This machine's speed changes by a quarter
        within seconds; both passes are timed alike, right after each other, so each round's ratio
        compares like with like, and the report takes the medians.

        Returns (tokens/s, seconds per window, limit seconds per window, limit over window, best), the
        first four medians over the rounds, ``best`` each product kind's fastest time (its best rate)."""
        self.train_pass()  # warm-up: buffers, BLAS threads
        ways = {kind: fastest_way(*kind[:3], self.model.dtype, steps=kind[3]) for kind in self.product_kinds()}
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
        clipping and the update: ``Trainer.train_step``'s time less its layers'), each the median over
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
        objects.append(("window", self.trainer, "train_step"))
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
        rest = float(np.median([p[("window", "train_step")] - sum(v for (n, _), v in p.items() if n != "window")
                                for k, p in per_pass if k == "train"]))
        return {"train": train, "eval": {n: median("eval", (n, "forward")) for n in names}, "train_rest": rest,
                "train_window": median("train", ("window", "train")), "eval_window": median("eval", ("window", "eval"))}

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
        targets = [get_batch(self.trainer.train_data, k * t.bptt, t.bptt)[1] for k in range(self.steps)]
        return [float(np.mean([((y >= a) & (y < b)).sum() for y in targets])) for a, b in zip(edges, edges[1:])]

    def products(self, backward=True):
        """(name, m, k, n, count) of every matrix product of one window (``backward=False``: the forward's)."""
        t = self.cfg.train
        return training_products(self.cfg.model, self.V, self.local_batch, t.bptt, backward, self.tail_rows)

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
        rows = [{"product": name, "shape": [m, k, n], "count": count,
                 "gflop_s": 2 * m * k * n / seconds[self.kind(name, m, k, n)] / 1e9} for name, m, k, n, count in products]
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
        "config": {"emb_size": cfg.model.emb_size, "hidden_size": cfg.model.hidden_size,
                   "num_layers": cfg.model.num_layers, "dropout": cfg.model.dropout,
                   "tie_weights": cfg.model.tie_weights, "vocab_size": vocab_size, "softmax": cfg.model.softmax,
                   "adaptive_cutoffs": cfg.model.adaptive_cutoffs, "tail_rows": b.tail_rows,
                   "batch_size": t.batch_size, "bptt": t.bptt, "optimizer": t.optimizer, "dtype": t.dtype,
                   "kernels": kernels_in_use()},
        "ranks": world.size,
        "repeats": repeats,
        "threads": {"blas": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
                    "blas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "default"),
                    "elementwise": __import__("lmtrain.backend", fromlist=["NUM_THREADS"]).NUM_THREADS},
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
        *([f"softmax     adaptive, cutoffs {c['adaptive_cutoffs']}; targets per window in each tail cluster: "
           + ", ".join(f"{n:.1f}" for n in c["tail_rows"])] if c["softmax"] == "adaptive" else []),
        f"training    {r['train_tokens_per_s']:>10,.0f} tokens/s   {r['train_step_ms']:.1f} ms per window, "
        f"{r['train_gflop_s']:.0f} GFLOP/s ({r['flops_per_token'] / 1e6:.1f} MFLOP per token)",
        f"limit       {r['limit_step_ms']:>10.1f} ms per window for its "
        f"{'rank' + chr(39) + 's ' if r['ranks'] > 1 else ''}matrix products alone: "
        f"{r['percent_of_limit']:.0f}% of the limit reached (median of {r['repeats']} rounds timing both; "
        f"each product at its shape's best rate: {r['limit_best_rates_ms']:.1f} ms)",
        f"evaluation  {r['eval_tokens_per_s']:>10,.0f} tokens/s   limit {r['eval_limit_tokens_per_s']:,.0f} tokens/s "
        f"(its forward products at their best measured rates)",
        *([f"ranks       {r['ranks']:>10}   {c['batch_size'] // r['ranks']} streams each; one Allreduce of the "
           f"{r['gradient_mb']:.1f} MB gradient buffer takes {r['allreduce_ms']:.1f} ms"] if r["ranks"] > 1 else []),
        f"generation  {r['generate_ms_per_token']:>10.2f} ms per token (batch 1)",
        f"peak RSS    {r['peak_rss_mb']:>10.0f} MB",
        "products of one training window (best rate measured for each shape):",
    ]
    for p in r["products"]:
        m, k, n = p["shape"]
        lines.append(f"  {p['product']:<30} ({m} x {k}) @ ({k} x {n}) x {p['count']:<3} {p['gflop_s']:7.1f} GFLOP/s")
    if "layers" in r:
        t = r["layers"]
        lines += [f"where a window's time goes (ms a window, medians of {r['repeats']} passes):",
                  f"  {'':<24} {'training':>18} {'evaluation':>12}",
                  f"  {'':<24} {'forward':>8} {'backward':>9} {'forward':>12}"]
        lines += [f"  {name:<24} {fwd:>8.2f} {bwd:>9.2f} {t['eval'][name]:>12.2f}" for name, (fwd, bwd) in t["train"].items()]
        lines += [f"  {'the rest of a step':<24} {t['train_rest']:>18.2f}   (gradient norm, clipping, update)",
                  f"  {'whole window':<24} {t['train_window']:>18.2f} {t['eval_window']:>12.2f}"]
    return "\n".join(lines)
