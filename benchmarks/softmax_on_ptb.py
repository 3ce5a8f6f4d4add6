"""Training speed of one config with the full softmax and with adaptive heads, on the corpus's own windows.

    python benchmarks/softmax_on_ptb.py                                   # configs/ptb-speedrun.yaml
    python benchmarks/softmax_on_ptb.py CONFIG --heads 1500,2000,3000 --windows 20 --turns 5

`lmtrain bench` draws its ids from Zipf's law; how many targets reach an adaptive softmax's tail depends
on the real word frequencies, so this reads the config's corpus (PTB: downloaded into data/ptb if
absent) and times ``Trainer.train_step`` on its training windows.  Each variant (the full softmax, then
tied tails with each head size) trains ``--windows`` windows per turn, the variants taking turns so that
drift hits all alike; the first turn is a warm-up, and the figure is the median of the others.
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import lmtrain  # noqa: E402,F401  before numpy: it sets OpenBLAS's thread timeout, read when numpy loads

import numpy as np  # noqa: E402

from lmtrain.config import load_config  # noqa: E402
from lmtrain.data.batching import get_batch  # noqa: E402
from lmtrain.data.sources import load_corpus  # noqa: E402
from lmtrain.train import Trainer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=os.path.join(ROOT, "configs", "ptb-speedrun.yaml"))
    ap.add_argument("--heads", default="1500,2000,3000", help="head sizes of the tied-tail variants")
    ap.add_argument("--windows", type=int, default=20, help="training windows per turn")
    ap.add_argument("--turns", type=int, default=5, help="turns of every variant (the first is a warm-up)")
    args = ap.parse_args()
    tied = ["model.softmax=adaptive", "model.adaptive_div=1", "model.adaptive_tie_tails=true"]
    variants = {"full softmax": ["model.softmax=full"]}
    variants.update({f"tied tails, head {h}": tied + [f"model.adaptive_cutoffs=[{h}]"]
                     for h in args.heads.split(",")})
    corpus = load_corpus(load_config(args.config).data)
    trainers = {name: Trainer(load_config(args.config, sets), tempfile.mkdtemp(), corpus, quiet=True)
                for name, sets in variants.items()}
    rates = {name: [] for name in trainers}
    for turn in range(args.turns):
        for name, tr in trainers.items():
            t = tr.cfg.train
            start = time.perf_counter()
            for k in range(args.windows):
                tr.train_step(*get_batch(tr.train_data, (turn * args.windows + k) * t.bptt, t.bptt), t.lr)
            rates[name].append(args.windows * t.bptt * t.batch_size / (time.perf_counter() - start))
    full = np.median(rates["full softmax"][1:])
    for name, r in rates.items():
        median = np.median(r[1:])
        print(f"{name:26s} {median:8,.0f} training tokens/s  ({median / full:.2f}x the full softmax)")


if __name__ == "__main__":
    main()
