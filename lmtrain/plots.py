"""PNG plots with matplotlib, an optional extra (`pip install -e '.[plot]'`).

Every function returns the path it wrote, or None when matplotlib is not
installed: the commands print their tables either way.
"""

import os

from lmtrain.errors import LmtrainError
from lmtrain.run_dir import MetricsLog

HOW_TO_PLOT = "for PNG plots install matplotlib: pip install -e '.[plot]'"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir):
    """The events of a run's metrics.jsonl (a last line cut off by a crash is left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise LmtrainError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    return MetricsLog(path).read()[0]


def run_curves(run_dir):
    """{"train": [(step, elapsed_s, ppl)], "valid": [...], "test": ppl or None} of a run."""
    events = read_metrics(run_dir)

    def pick(kind):
        return [
            (e["step"], e["elapsed_s"], e["ppl"]) for e in events if e.get("event") == kind and e.get("ppl") is not None
        ]

    test = [e["ppl"] for e in events if e.get("event") == "test"]
    return {"train": pick("train"), "valid": pick("valid"), "test": test[-1] if test else None}


def plot_runs(run_dirs, out):
    """Training and validation perplexity against steps and against elapsed time, runs overlaid."""
    curves = {os.path.basename(os.path.normpath(d)) or d: run_curves(d) for d in run_dirs}
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, c), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        for ax, x in ((axes[0], 0), (axes[1], 1)):
            if c["train"]:
                ax.plot(
                    [r[x] for r in c["train"]],
                    [r[2] for r in c["train"]],
                    color=color,
                    alpha=0.35,
                    lw=1,
                    label=f"{name} train",
                )
            if c["valid"]:
                ax.plot(
                    [r[x] for r in c["valid"]],
                    [r[2] for r in c["valid"]],
                    color=color,
                    marker="o",
                    lw=2,
                    label=f"{name} valid" + (f" (test {c['test']:.4g})" if c["test"] else ""),
                )
    for ax, label in ((axes[0], "optimizer steps"), (axes[1], "elapsed seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("perplexity against steps")
    axes[1].set_title("perplexity against wall-clock time")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_recall(results, out, seeds=None):
    """Accuracy against distance; ``results``: label -> rows of probes.recall.  One line per model, except
    for the models of a group in ``seeds`` (see the CLI): their median, with the range over seeds shaded."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    distances = [r["distance"] for r in next(iter(results.values()))]
    grouped = {m for g in (seeds or {}).values() for m in g["members"]}
    for label, rows in results.items():
        if label not in grouped:
            ax.plot(distances, [r["accuracy"] for r in rows], marker="o", label=label)
    for name, g in (seeds or {}).items():
        (line,) = ax.plot(distances, g["median"], marker="o", label=f"{name}: median, range shaded")
        ax.fill_between(distances, g["min"], g["max"], color=line.get_color(), alpha=0.2)
    chance = next(iter(results.values()))[0]["chance"]
    ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance ({chance:.2f})")
    ax.set_xlabel("distance (distractor tokens between the name and the question)")
    ax.set_ylabel("correct name ranked first")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_gradflow(results, out, title=None):
    """Gradient norm against k on a log scale; ``results``: label -> {"h": norms, "c": norms}."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, norms in results.items():
        for state, values in norms.items():
            ax.plot(range(len(values)), values, label=f"{label}: d loss / d {state}")
    ax.set_yscale("log")
    ax.set_xlabel("k: steps before the loss")
    ax.set_ylabel("mean gradient norm")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
