"""lmtrain against PyTorch's nn.LSTM: the same model, the same machine, one process, alternating.

    python benchmarks/compare_torch.py                       # configs S and M
    python benchmarks/compare_torch.py configs/ptb-small.yaml --repeats 9 --json

For each config, the PyTorch model (Embedding, nn.LSTM, Linear, the same
dropout, tying, clipping and plain SGD) and lmtrain's train_step run
the same synthetic token ids.  They take turns, repeat after repeat, so that
drift on a shared machine hits both alike, with a pause between turns so that
one library's idle threads (OpenBLAS's and OpenMP's spin for a while after
their last call) do not take a core from the other's turn, and one untimed
pass after the pause, so that the timed pass finds its threads awake, as a
long run does.  Each rate is the median of a library's turns; each speedup is
the median of the pairs' ratios (a repeat's turn of lmtrain and its turn of
PyTorch, one right after the other; lmtrain goes first in every other repeat
and PyTorch in the rest, so that what one library leaves behind, in the
caches or in its threads, falls on both alike), and only the speedups are
meant to be compared.  torch is an optional extra: `pip install -e '.[bench]'`
(on the project's machines `pip install torch==2.13.0` takes the CPU build
from local disk).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# isort: off
import lmtrain  # noqa: E402,F401  before numpy: it sets how OpenBLAS's idle threads wait, read when numpy loads
# isort: on

import numpy as np  # noqa: E402

try:
    import torch
except ImportError:
    print(
        "PyTorch is not installed, so there is nothing to compare against: pip install -e '.[bench]' "
        "(on the project's machines: pip install torch==2.13.0)"
    )
    sys.exit(0)

from lmtrain.bench import Bench  # noqa: E402
from lmtrain.config import load_config  # noqa: E402
from lmtrain.data.batching import get_batch  # noqa: E402

DEFAULT_CONFIGS = ["configs/ptb-dlfs2.yaml", "configs/ptb-dlfs2-better.yaml"]


class TorchLM(torch.nn.Module):
    def __init__(self, cfg, V):
        super().__init__()
        m = cfg.model
        self.drop = torch.nn.Dropout(m.dropout)
        self.emb = torch.nn.Embedding(V, m.emb_size)
        self.lstm = torch.nn.LSTM(
            m.emb_size, m.hidden_size, m.num_layers, dropout=m.dropout if m.num_layers > 1 else 0.0
        )
        self.dec = torch.nn.Linear(m.hidden_size, V)
        if m.tie_weights:
            self.dec.weight = self.emb.weight
        with torch.no_grad():  # the same scale as lmtrain's uniform initialisation
            for p in self.parameters():
                p.uniform_(-m.init_scale, m.init_scale)

    def forward(self, x, state):
        out, state = self.lstm(self.drop(self.emb(x)), state)
        return self.dec(self.drop(out)), state


class TorchBench:
    def __init__(self, cfg, data, V, steps):
        self.cfg, self.data, self.V, self.steps = cfg, torch.from_numpy(data.astype(np.int64)), V, steps
        self.model = TorchLM(cfg, V)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.SGD(self.params, lr=cfg.train.lr)

    def windows(self):
        T = self.cfg.train.bptt
        for k in range(self.steps):
            yield get_batch(self.data, k * T, T)

    def train(self):
        self.model.train()
        state = None
        for x, y in self.windows():
            if state is not None:
                state = tuple(s.detach() for s in state)
            out, state = self.model(x, state)
            loss = torch.nn.functional.cross_entropy(out.view(-1, self.V), y.reshape(-1))
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.clip_grad_norm or float("inf"))
            self.opt.step()

    def evaluate(self):
        self.model.eval()
        state = None
        with torch.no_grad():
            for x, y in self.windows():
                out, state = self.model(x, state)
                torch.nn.functional.cross_entropy(out.view(-1, self.V), y.reshape(-1))

    def generate(self, tokens=50):
        self.model.eval()
        state, tok = None, torch.ones((1, 1), dtype=torch.long)
        with torch.no_grad():
            for _ in range(tokens + 1):
                out, state = self.model(tok, state)
                p = torch.softmax(out[-1, 0].double(), dim=0)
                tok = torch.multinomial(p, 1).view(1, 1)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def turn(fn, pause):
    """One library's turn: the pause, one untimed pass, then the timed one.  After a pause the first
    windows run slowly (threads and cores wake up): at config S a pass of evaluation, 10 windows,
    took 7-11% longer for lmtrain straight after it than after an untimed pass, and 3% longer to
    2% shorter for PyTorch.  A long run is awake throughout, so the timed pass is the second."""
    time.sleep(pause)
    fn()
    return timed(fn)


def compare(path, steps, repeats, vocab_size, gen_tokens=50, pause=0.5, torch_only=False):
    """Both, alternating; with ``torch_only``, PyTorch alone (no lmtrain work in the process), as a check
    that alternating does not slow it."""
    cfg = load_config(path)
    ours = Bench(cfg, vocab_size, steps)
    theirs = TorchBench(cfg, ours.streams.data, vocab_size, steps)
    tokens = ours.tokens_per_pass()

    pairs = {
        "train": (ours.train_pass, theirs.train),
        "eval": (ours.eval_pass, theirs.evaluate),
        "generate": (lambda: ours.generate_pass(gen_tokens), lambda: theirs.generate(gen_tokens)),
    }
    result = {
        "config": path,
        "threads": {"torch": torch.get_num_threads()},
        "steps": steps,
        "repeats": repeats,
        "kernels": ours.model.layers.name,
    }
    for name, (mine, other) in pairs.items():
        if not torch_only:
            mine()  # warm-up
        other()
        a, b = [], []
        turns = [(other, b)] if torch_only else [(mine, a), (other, b)]
        for i in range(repeats):  # alternate, so drift hits both; who goes first alternates too
            for fn, times in turns if i % 2 == 0 else turns[::-1]:
                times.append(turn(fn, pause))
        # The speedup is the median of each pair's ratio, not the ratio of the medians: this machine runs
        # a quarter slower for seconds at a time, and a pair's two turns, a second apart, share that phase.
        ratios = np.divide(b, a) if a else None
        a, b = (float(np.median(a)) if a else None), float(np.median(b))
        unit, figure = (
            ("ms_per_token", lambda s: 1000 * s / gen_tokens)
            if name == "generate"
            else ("tokens_per_s", lambda s: tokens / s)
        )
        result[name] = {
            f"lmtrain_{unit}": None if a is None else figure(a),
            f"torch_{unit}": figure(b),
            "speedup": None if ratios is None else float(np.median(ratios)),
            "pair_speedups": None if ratios is None else [round(float(r), 3) for r in ratios],
        }
    return result


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    ap.add_argument("--steps", type=int, default=10, help="windows per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--vocab-size", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: its own choice)")
    ap.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds between turns: both libraries' idle threads spin for a while after their "
        "last call, and would take a core from the other's turn",
    )
    ap.add_argument(
        "--torch-only",
        action="store_true",
        help="time PyTorch alone, with no lmtrain work in between (a check on the alternation)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    results = [
        compare(c, args.steps, args.repeats, args.vocab_size, pause=args.pause, torch_only=args.torch_only)
        for c in args.configs
    ]
    if args.json:
        print(json.dumps(results))
        return
    alternating = "repeats of PyTorch alone" if args.torch_only else "alternating repeats"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; numpy {np.__version__}, "
        f"element-wise kernels: {results[0]['kernels']}; medians of {args.repeats} {alternating} "
        f"of {args.steps} windows; lmtrain/PyTorch is the median of the repeats' own ratios"
    )
    print(f"{'config':<34} {'':<9} {'lmtrain':>12} {'PyTorch':>12} {'lmtrain/PyTorch':>16}")
    for r in results:
        for name in ("train", "eval"):
            row = r[name]
            print(
                f"{r['config']:<34} {name:<9} {_fmt(row['lmtrain_tokens_per_s'], ',.0f'):>12} "
                f"{row['torch_tokens_per_s']:>12,.0f} {_fmt(row['speedup'], '.2f', 'x'):>16}"
            )
        g = r["generate"]
        print(
            f"{r['config']:<34} {'generate':<9} {_fmt(g['lmtrain_ms_per_token'], '.2f', ' ms'):>12} "
            f"{g['torch_ms_per_token']:>9.2f} ms {_fmt(g['speedup'], '.2f', 'x'):>16}"
        )


if __name__ == "__main__":
    main()
