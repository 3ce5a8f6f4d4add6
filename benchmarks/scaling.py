"""Data-parallel throughput on this machine: 1 process x T threads against K ranks x T/K threads.

    python benchmarks/scaling.py                      # configs S and M, 2 cores: 1 x 2 against 2 x 1
    python benchmarks/scaling.py --repeats 5 --json

Each repeat runs `lmtrain bench` once per setting, the settings taking turns
so that drift on a shared machine hits them alike; every figure is a median
over repeats.  The K-rank settings run under mpiexec, once through shared
memory and once with every message forced through MPICH's network path
(MPIR_CVAR_NOLOCAL=1), as between machines.  Needs the mpi extra:
`pip install -e '.[mpi]'`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ["configs/ptb-dlfs2.yaml", "configs/ptb-dlfs2-better.yaml"]


def bench(config, ranks, threads, steps, network=False):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), LMTRAIN_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "lmtrain", "bench", config, "--json", "--repeats", "3", "--steps", str(steps)]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
        cmd = [mpiexec, "-n", str(ranks), *cmd, "--set", f"train.threads_per_rank={threads}"]
        if network:
            env["MPIR_CVAR_NOLOCAL"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="windows per timed repeat inside each bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    K, cores = args.ranks, args.cores
    settings = {
        f"1 x {cores}": (1, cores, False),
        f"{K} x {cores // K}": (K, cores // K, False),
        f"{K} x {cores // K}, network path": (K, cores // K, True),
    }
    results = []
    for config in args.configs:
        runs = {name: [] for name in settings}
        for _ in range(args.repeats):
            for name, (ranks, threads, network) in settings.items():
                runs[name].append(bench(config, ranks, threads, args.steps, network))
        row = {"config": config}
        for name, rs in runs.items():
            median = lambda key: float(np.median([r[key] for r in rs]))  # noqa: E731
            row[name] = {
                "train_tokens_per_s": median("train_tokens_per_s"),
                "step_ms": median("train_step_ms"),
                "allreduce_ms": median("allreduce_ms"),
                "gradient_mb": rs[0]["gradient_mb"],
                "eval_tokens_per_s": median("eval_tokens_per_s"),
            }
        results.append(row)
    if args.json:
        print(json.dumps(results))
        return
    print(f"medians of {args.repeats} alternating repeats; {cores} cores")
    print(f"{'config':<32} {'setting':<22} {'train tok/s':>12} {'step ms':>9} {'allreduce ms':>13} {'eval tok/s':>11}")
    for row in results:
        for name in settings:
            r = row[name]
            print(
                f"{row['config']:<32} {name:<22} {r['train_tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} "
                f"{r['allreduce_ms']:>13.2f} {r['eval_tokens_per_s']:>11,.0f}"
            )
        print(f"{'':<32} gradient buffer {row[next(iter(settings))]['gradient_mb']:.1f} MB per step")


if __name__ == "__main__":
    main()
