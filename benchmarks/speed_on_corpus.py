"""Training speed of variants of one config, side by side on the corpus's own windows.

    python benchmarks/speed_on_corpus.py                      # configs/ptb-speedrun.yaml: softmax heads
    python benchmarks/speed_on_corpus.py CONFIG --heads 1500,2000,3000 --windows 20 --turns 5
    python benchmarks/speed_on_corpus.py --variant 'batch 10:train.batch_size=10' \
        --variant 'bptt 70:train.bptt=70'                    # the config itself against these

`lmtrain bench` draws its ids from Zipf's law; how many targets reach an adaptive softmax's tail depends
on the real word frequencies, so this reads the config's corpus (PTB: downloaded into data/ptb if
absent) and times ``train_step`` on its training windows.  Without ``--variant`` the variants
are the full softmax and tied tails with each head size, against the full softmax; with it, the
config as it is and each ``NAME:KEY=VALUE[,KEY=VALUE...]``, against the config.  Each variant trains
``--windows`` windows per turn, the variants taking turns so that drift hits all alike; the first turn
is a warm-up, and the figure is the median of the others.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# isort: off
import lmtrain  # noqa: E402,F401  before numpy: it sets how OpenBLAS's idle threads wait, read when numpy loads
# isort: on

import numpy as np  # noqa: E402

from lmtrain.config import load_config  # noqa: E402
from lmtrain.data.sources import load_corpus  # noqa: E402
from lmtrain.training import Run, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=os.path.join(ROOT, "configs", "ptb-speedrun.yaml"))
    ap.add_argument("--heads", default="1500,2000,3000", help="head sizes of the tied-tail variants")
    ap.add_argument("--windows", type=int, default=20, help="training windows per turn")
    ap.add_argument("--turns", type=int, default=5, help="turns of every variant (the first is a warm-up)")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
        help="time this override of the config against the config itself (repeatable)",
    )
    args = ap.parse_args()
    if args.variant:
        variants = {"the config": []}
        for spec in args.variant:
            name, _, sets = spec.partition(":")
            if not name or "=" not in sets:
                sys.exit(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
            variants[name] = sets.split(",")
    else:
        tied = ["model.softmax=adaptive", "model.adaptive_div=1", "model.adaptive_tie_tails=true"]
        variants = {"full softmax": ["model.softmax=full"]}
        variants.update(
            {f"tied tails, head {h}": tied + [f"model.adaptive_cutoffs=[{h}]"] for h in args.heads.split(",")}
        )
    corpus = load_corpus(load_config(args.config).data)
    runs = {
        name: Run(load_config(args.config, sets), tempfile.mkdtemp(), corpus, quiet=True)
        for name, sets in variants.items()
    }
    rates = {name: [] for name in runs}
    for turn in range(args.turns):
        for name, run in runs.items():
            t = run.cfg.train
            start = time.perf_counter()
            for k in range(args.windows):
                x, y = run.streams.window((turn * args.windows + k) * t.bptt, t.bptt)
                train_step(run.model, run.optimizer, run.streams, x, y, t.lr, t.clip_grad_norm, run.world)
            rates[name].append(args.windows * t.bptt * t.batch_size / (time.perf_counter() - start))
    first = next(iter(rates))
    reference = np.median(rates[first][1:])
    for name, r in rates.items():
        median = np.median(r[1:])
        print(f"{name:26s} {median:8,.0f} training tokens/s  ({median / reference:.2f}x {first})")


if __name__ == "__main__":
    main()
