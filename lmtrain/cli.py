"""Command line: parse, call (lmtrain/commands.py), print.  Every user error is one line and a non-zero exit."""

import json
import math
import os
import signal
import sys
import time

import click
import numpy as np

from lmtrain import __version__, commands
from lmtrain.data.corpus import unk_advice
from lmtrain.errors import LmtrainError
from lmtrain.world import CollectiveError, current_world


def _debug_requested(argv):
    return "--debug" in argv or os.environ.get("LMTRAIN_DEBUG") == "1"


debug_option = click.option("--debug", is_flag=True, help="Show the full traceback of an error.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmtrain")
@debug_option
def cli(debug):
    """Train, evaluate and sample word-level LSTM language models in numpy."""


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=True))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set train.lr=0.5 (repeatable).",
)
@click.option("--run-dir", type=click.Path(), help="Run directory (default: output.dir/output.name).")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="last",
    default=None,
    metavar="[PATH]",
    help="Continue the run from its last.npz, from the checkpoint PATH, or (without CONFIG) the run in the "
    "directory PATH with its own config.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the run directory.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary lines.")
@debug_option
def fit(config, overrides, run_dir, resume, overwrite, quiet, debug):
    """Train the model CONFIG (a YAML file, or a preset's name: lmtrain presets) describes.

    lmtrain fit --resume RUN_DIR continues a run with its own config.  Under an MPI launcher
    (mpiexec -n K lmtrain fit CONFIG) the K processes train together, data-parallel: see docs/scaling.md.
    """
    world = commands.fit(
        config, overrides, run_dir, resume, overwrite, quiet, click.echo, lambda line: click.echo(line, err=True)
    )
    world.barrier()  # no rank leaves while rank 0 still writes (a launcher may stop the job when one ends)


@cli.command()
@click.argument("source", default="-", metavar="[FILE|-]")
@click.option("--ckpt", type=click.Path(), help="Checkpoint (default: best.npz of the latest run under runs/).")
@click.option(
    "--mode",
    type=click.Choice(["independent", "stream"]),
    default="independent",
    show_default=True,
    help="independent: every line from a zero state (rescoring); stream: the state carried from line to "
    "line (as eval reads a file).",
)
@click.option("--per-word", is_flag=True, help="Also each word's log-probability.")
@click.option(
    "--base",
    type=click.Choice(["e", "10", "2"]),
    default="e",
    show_default=True,
    help="Logarithm base of the log-probabilities (10: what speech toolkits take; 2: bits).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="independent: lines scored together.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@debug_option
def score(source, ckpt, mode, per_word, base, batch_size, as_json, debug):
    """Log-probability of each line of FILE (or standard input) and of each word in it, the <eos> after
    each line included; a summary with perplexity and bits per word on standard error."""
    from lmtrain.scoring import in_base, summary

    if mode == "stream" and click.get_current_context().get_parameter_source("batch_size").name == "COMMANDLINE":
        raise LmtrainError("--batch-size applies to --mode independent; a stream is one sequence")
    ckpt = ckpt or commands.latest_checkpoint(lambda line: click.echo(line, err=True))
    start = time.perf_counter()
    scored, vocab = commands.score(ckpt, source, mode, batch_size)
    for n, s in enumerate(scored, 1):
        total = in_base(float(np.sum(s["logp"])), base)
        ppl = math.exp(-float(np.sum(s["logp"])) / len(s["logp"]))
        if as_json:
            row = {
                "line": n,
                "text": s["text"],
                "logprob": total,
                "base": base,
                "tokens": len(s["logp"]),
                "ppl": ppl,
                "unknown": s["unknown"],
            }
            if per_word:
                row["words"] = [[w, in_base(float(p), base)] for w, p in zip(s["words"], s["logp"])]
            click.echo(json.dumps(row, ensure_ascii=False))
            continue
        click.echo(f"{total:.4f}\t{len(s['logp'])}\t{ppl:.2f}\t{','.join(s['unknown'])}\t{s['text']}")
        if per_word:
            for w, p in zip(s["words"], s["logp"]):
                click.echo(f"\t{w}\t{in_base(float(p), base):.4f}")
    lines, tokens, logp, unk = summary(scored)
    click.echo(
        f"{lines:,} lines, {tokens:,} tokens ({100 * unk / tokens:.1f}% <unk>), {mode}: perplexity "
        f"{math.exp(-logp / tokens):.2f}, {-logp / tokens / math.log(2):.3f} bits per word, "
        f"{time.perf_counter() - start:.1f} s",
        err=True,
    )


@cli.command()
@click.option("--ckpt", type=click.Path(), help="Checkpoint (default: best.npz of the latest run under runs/).")
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["onnx", "safetensors"]),
    help="onnx: a graph from token ids and states to log-probabilities and states; safetensors: the "
    "weights under PyTorch's names and layouts (docs/export.md).",
)
@click.option("--out", required=True, type=click.Path(), help="File to write.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64"]),
    help="Type of the weights written (default: the checkpoint's; onnxruntime runs float32).",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@debug_option
def export(ckpt, fmt, out, dtype, overwrite, debug):
    """Write a model for use outside lmtrain: ONNX (onnxruntime) or safetensors (PyTorch); the extra
    pip install 'lmtrain[export]' brings what they need."""
    from lmtrain.export import export as run_export

    ckpt = ckpt or commands.latest_checkpoint(lambda line: click.echo(line, err=True))
    click.echo(f"wrote {run_export(ckpt, fmt, out, overwrite=overwrite, dtype=dtype)}")


@cli.command()
@debug_option
def presets(debug):
    """The presets that come with lmtrain, run by name: lmtrain fit NAME."""
    from lmtrain import preset

    rows = [(name, preset.about(name)) for name in preset.names()]
    width = max(len(name) for name, _ in rows)
    for name, about in rows:
        click.echo(f"{name:<{width}}  {about.get('corpus', '')}")
        click.echo(
            f"{'':<{width}}  {about.get('model', '')}; time on 2 cores: {about.get('time', '')}; "
            f"{about.get('result', '')}"
        )
    click.echo(f"run one with: lmtrain fit NAME (the files are in {preset.DIR})")


@cli.command("eval")
@click.option("--ckpt", type=click.Path(), help="Checkpoint (default: best.npz of the latest run under runs/).")
@click.option("--split", type=click.Choice(["valid", "test"]), help="Split of the checkpoint's corpus [default: test].")
@click.option("--text", "text_file", type=click.Path(), help="Evaluate on this text file instead of a split.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Parallel streams (default: the run's train.eval_batch_size; 1 with --cache or --dynamic).",
)
@click.option("--cache", is_flag=True, help="Add the neural cache (Grave et al. 2017) over recent hidden states.")
@click.option(
    "--cache-window",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Cache: pairs (hidden state, next word) kept, the latest N.",
)
@click.option(
    "--cache-theta",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Cache: sharpness of the match between hidden states.",
)
@click.option(
    "--cache-lambda",
    type=click.FloatRange(0, 1),
    default=0.15,
    show_default=True,
    help="Cache: its weight in the mixture with the model.",
)
@click.option(
    "--dynamic",
    is_flag=True,
    help="Add dynamic evaluation (Krause et al. 2018): adapt the weights to each segment after scoring it.",
)
@click.option(
    "--dyn-lr",
    type=click.FloatRange(min=0),
    default=3e-4,
    show_default=True,
    help="Dynamic evaluation: step size of the RMS-normalised update.",
)
@click.option(
    "--dyn-decay",
    type=click.FloatRange(min=0),
    default=0.01,
    show_default=True,
    help="Dynamic evaluation: pull back towards the trained weights, per step.",
)
@click.option(
    "--dyn-segment",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Dynamic evaluation: tokens scored between two updates.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def eval_cmd(
    ckpt,
    split,
    text_file,
    batch_size,
    cache,
    cache_window,
    cache_theta,
    cache_lambda,
    dynamic,
    dyn_lr,
    dyn_decay,
    dyn_segment,
    as_json,
    debug,
):
    """Perplexity of a checkpoint over a whole split or file; with --cache and/or --dynamic, beside the
    base perplexity of the same stream (batch 1), each method's (docs/evaluation.md)."""
    _refuse_together("cache", ["cache_window", "cache_theta", "cache_lambda"])
    _refuse_together("dynamic", ["dyn_lr", "dyn_decay", "dyn_segment"])
    cache_settings = dict(window=cache_window, theta=cache_theta, lam=cache_lambda) if cache else None
    dyn_settings = dict(lr=dyn_lr, decay=dyn_decay, segment=dyn_segment) if dynamic else None
    ckpt = ckpt or commands.latest_checkpoint(lambda line: click.echo(line, err=True))
    r = commands.evaluate(ckpt, split, text_file, batch_size, cache_settings, dyn_settings, _log(as_json))
    if as_json:
        click.echo(json.dumps(r))
        return
    unk = f"{100 * r['unk']:.1f}% <unk>"
    if "results" not in r:
        click.echo(
            f"{r['split']} perplexity {r['ppl']:.2f} ({r['bits_per_word']:.3f} bits per word, loss "
            f"{r['loss']:.4f}) over {r['tokens']:,} tokens ({unk}), batch size {r['batch_size']}, "
            f"checkpoint {ckpt}"
        )
    else:
        base = r["results"]["base"]["ppl"]
        click.echo(f"{r['split']}, {r['tokens']:,} tokens ({unk}), one stream, checkpoint {ckpt}")
        for name, m in r["results"].items():
            change = "" if name == "base" else f"  ({100 * (m['ppl'] / base - 1):+.1f}%)"
            click.echo(
                f"  {name:<14} perplexity {m['ppl']:8.2f}{change}  {m['bits_per_word']:6.3f} bits per word"
                f"   {m['seconds']:.0f} s"
            )
    advice = unk_advice(r["unk"], "evaluated")
    if advice:
        click.echo(advice.strip(), err=True)


def _refuse_together(needs, names):
    """Refuse the options ``names`` given on the command line unless ``needs`` (an option's name) is: they do
    nothing without it, and a run that silently ignores a flag is worse than an error."""
    ctx = click.get_current_context()
    given = [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given and not ctx.params.get(needs):
        flag = "--" + given[0].replace("_", "-")
        raise LmtrainError(f"{flag} applies only with --{needs.replace('_', '-')}")


def _log(as_json):
    """Where progress lines go: nowhere with --json, which keeps stdout one JSON object."""
    return commands.NO_OUTPUT if as_json else click.echo


@cli.command("tune-eval")
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (.npz) to tune for.")
@click.option("--method", required=True, type=click.Choice(["cache", "dynamic"]), help="Method to tune.")
@click.option(
    "--tokens",
    type=click.IntRange(min=100),
    help="Tune on the first N tokens of the validation split (default: all of it).",
)
@click.option(
    "--dyn-segment",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Dynamic evaluation: tokens scored between two updates.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def tune_eval(ckpt, method, tokens, dyn_segment, as_json, debug):
    """Search the settings of --cache or --dynamic on the validation split (the test split is never read)
    and print the command that applies the best ones to the test split."""
    r = commands.tune(ckpt, method, tokens, dyn_segment, _log(as_json))
    rows, base, best = r["rows"], r["base"], r["best"]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ckpt": ckpt,
                    "method": method,
                    "split": "valid",
                    "tokens": r["tokens"],
                    "base_ppl": base,
                    "best": best,
                    "command": r["command"],
                    # a diverged trial's perplexity (NaN) as null: NaN is not JSON
                    "trials": [{**t, "ppl": t["ppl"] if math.isfinite(t["ppl"]) else None} for t in rows],
                    "seconds": round(r["seconds"], 1),
                }
            )
        )
        return
    click.echo(f"{method} on validation ({r['tokens']:,} tokens, one stream): base perplexity {base:.2f}")
    for t in rows[:5]:
        click.echo(
            "  "
            + "  ".join(f"{k} {v:g}" for k, v in t.items() if k != "ppl")
            + (f"  ->  {t['ppl']:.2f}" if math.isfinite(t["ppl"]) else "  ->  diverged")
        )
    click.echo(
        f"best: {base:.2f} -> {best['ppl']:.2f} ({100 * (best['ppl'] / base - 1):+.1f}%), "
        f"{len(rows)} settings tried in {r['seconds']:.0f} s; on the test split:\n  {r['command']}"
    )


@cli.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@debug_option
def prepare(config, overrides, debug):
    """Download CONFIG's corpus if needed and tokenise it into data/cache/ (fit does this by itself when
    the prepared files are missing; a second prepare finds them and does nothing)."""
    click.echo(commands.prepare(config, overrides, click.echo))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option(
    "--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Training windows per timed repeat."
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Timed repeats after warm-up; medians are reported.",
)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=3),
    default=10000,
    show_default=True,
    help="Vocabulary of the synthetic token ids.",
)
@click.option("--layers", is_flag=True, help="Also time each layer's forward and backward: where a window's time goes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def bench(config, overrides, steps, repeats, vocab_size, layers, as_json, debug):
    """Time training, evaluation and generation of CONFIG's model on this machine (under mpiexec: with
    every rank training its share of the batch, and the Allreduce of the gradients timed too)."""
    from lmtrain.bench import format_report

    report, world = commands.bench(
        config, overrides, steps, repeats, vocab_size, layers, lambda line: click.echo(line, err=True)
    )
    if report is not None:
        click.echo(json.dumps(report) if as_json else format_report(report))
    world.barrier()


def _distances(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, e.g. 5,10,20; got {text!r}") from None
    if not values or min(values) < 0:
        raise click.BadParameter(f"expected non-negative integers, e.g. 5,10,20; got {text!r}")
    return values


def _name_error_lines(label, report, confusions=8):
    """`probe recall --errors`: a model's wrong answers by expected name, then its most frequent confusions."""
    head = f"{label}: {report['wrong']:,} of {report['stories']:,} answers wrong"
    if not report["wrong"]:
        return [head]
    lines = [
        head + f" ({report['speaker_answers']} of them name the speaker)",
        f"  {'expected':>10} {'stories':>7} {'wrong':>6} {'accuracy':>8} {'answered':>8}",
    ]
    flawless = [name for name, r in report["names"].items() if not r["wrong"]]
    for name, r in report["names"].items():
        if r["wrong"]:
            accuracy = 1 - r["wrong"] / r["stories"]
            lines.append(f"  {name:>10} {r['stories']:>7} {r['wrong']:>6} {accuracy:>8.3f} {r['answered']:>8}")
    if flawless:
        lines.append(f"  no errors: {', '.join(flawless)}")
    lines.append(
        "  most frequent (expected -> answered): "
        + ", ".join(f"{e} -> {w} x{c}" for e, w, c in report["confusions"][:confusions])
    )
    return lines


def _say_plot(written, path):
    from lmtrain.plots import HOW_TO_PLOT

    click.echo(f"plot written to {path}" if written else f"(no plot: {HOW_TO_PLOT})")


@cli.group()
def probe():
    """Measure what a model remembers and how far its gradients reach back."""


@probe.command("recall")
@click.option(
    "--ckpt",
    "ckpts",
    required=True,
    multiple=True,
    type=click.Path(),
    help="Checkpoint of a model trained on the built-in stories (repeat to compare models).",
)
@click.option("--distances", default="5,10,20,40,80", show_default=True, help="Comma-separated distances.")
@click.option(
    "--stories", type=click.IntRange(min=1), default=200, show_default=True, help="Held-out stories per distance."
)
@click.option(
    "--mode",
    type=click.Choice(["stream", "prompt"]),
    default="stream",
    show_default=True,
    help="stream: stories in sequence, state carried (as trained); prompt: each alone from an "
    "empty state (as generate).",
)
@click.option("--plot", "plot_path", default="recall.png", show_default=True, help="PNG to write.")
@click.option(
    "--errors", "show_errors", is_flag=True, help="Also say, per model, which names it gets wrong and what it answers."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def probe_recall(ckpts, distances, stories, mode, plot_path, show_errors, as_json, debug):
    """Accuracy of the name after "said hi to", per distance, on held-out stories."""
    from lmtrain.plots import plot_recall

    distances = _distances(distances)
    results, paths, seeds, chance, errors = commands.probe_recall(ckpts, distances, stories, mode)
    accuracy = lambda rows: [r["accuracy"] for r in rows]  # noqa: E731
    if as_json:
        models = {k: {"ckpt": paths[k], "accuracy": accuracy(v)} for k, v in results.items()}
        if show_errors:
            for k in models:
                models[k]["errors"] = errors[k]
        click.echo(
            json.dumps(
                {
                    "distances": distances,
                    "models": models,
                    "seeds": seeds,
                    "stories": stories,
                    "mode": mode,
                    "chance": chance,
                }
            )
        )
    else:
        rows = [(label, accuracy(v)) for label, v in results.items()]
        for name, g in seeds.items():
            rows += [(f"{name}: min", g["min"]), (f"{name}: median", g["median"])]
        width = max(len(label) for label, _ in rows)
        click.echo(f"{'distance':>{width}} " + " ".join(f"{d:>7}" for d in distances))
        for label, values in rows:
            click.echo(f"{label:>{width}} " + " ".join(f"{v:>7.3f}" for v in values))
        click.echo(
            f"{stories} held-out stories per distance, read in {mode} mode; chance {chance:.3f}"
            + ("; min and median over the seeds of each model" if seeds else "")
        )
        if show_errors:
            for label in errors:
                click.echo("\n" + "\n".join(_name_error_lines(label, errors[label])))
    written = plot_recall(results, plot_path, seeds)
    if not as_json:
        _say_plot(written, plot_path)


@probe.command("gradflow")
@click.option("--ckpt", "ckpts", multiple=True, type=click.Path(), help="Checkpoint (repeat to compare models).")
@click.option(
    "--config",
    "configs",
    multiple=True,
    type=click.Path(),
    help="With --init-only: probe a freshly initialised model of this config (repeatable).",
)
@click.option("--init-only", is_flag=True, help="Probe models at initialisation, from --config.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of every --config, e.g. --set data.root=data/ptb.",
)
@click.option("--seeds", help="With --init-only: probe each --config at each of these seeds, e.g. 0,1,2.")
@click.option(
    "--steps", type=click.IntRange(min=2), default=100, show_default=True, help="Largest k: how many steps back."
)
@click.option("--batches", type=click.IntRange(min=1), default=10, show_default=True, help="Windows averaged over.")
@click.option(
    "--split",
    type=click.Choice(["valid", "test", "train"]),
    default="valid",
    show_default=True,
    help="Data the windows come from.",
)
@click.option("--plot", "plot_path", default="gradflow.png", show_default=True, help="PNG to write.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def probe_gradflow(ckpts, configs, init_only, overrides, seeds, steps, batches, split, plot_path, as_json, debug):
    """Gradient norm at the state k steps before a loss, for k = 0..steps, and its per-step decay."""
    from lmtrain.plots import plot_gradflow

    results, rates, spread = commands.probe_gradflow(
        ckpts, configs, init_only, overrides, _distances(seeds) if seeds else None, steps, batches, split
    )
    when = "at initialisation" if init_only else "trained"
    if as_json:
        click.echo(
            json.dumps(
                {
                    "steps": list(range(steps + 1)),
                    "split": split,
                    "batches": batches,
                    "when": when,
                    "models": {
                        k: {"norms": {s: list(map(float, v)) for s, v in n.items()}, "decay_per_step": rates[k]}
                        for k, n in results.items()
                    },
                    "seeds": {name: dict(g, states=list(rates[g["members"][0]])) for name, g in spread.items()},
                }
            )
        )
    else:
        columns = [(label, state) for label, norms in results.items() for state in norms]
        click.echo(f"mean gradient norm k steps before the loss, models {when}")
        click.echo("k      " + "  ".join(f"{(lab.split(' ')[0] + ' ' + st):>12}" for lab, st in columns))
        for k in sorted(set(list(range(0, min(10, steps + 1))) + list(range(10, steps + 1, 10)) + [steps])):
            click.echo(f"{k:<6} " + "  ".join(f"{results[lab][st][k]:>12.3e}" for lab, st in columns))
        for label, r in rates.items():
            click.echo(f"{label}: per-step log-decay " + ", ".join(f"d/d{s} {v:+.4f}" for s, v in r.items()))
        for name, g in spread.items():
            states = list(rates[g["members"][0]])
            click.echo(
                f"{name}: per-step log-decay, median (range) "
                + ", ".join(
                    f"d/d{s} {g['median'][i]:+.4f} ({g['min'][i]:+.4f} .. {g['max'][i]:+.4f})"
                    for i, s in enumerate(states)
                )
            )
    written = plot_gradflow(results, plot_path, title=f"models {when}")
    if not as_json:
        _say_plot(written, plot_path)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="curves.png", show_default=True, help="PNG to write.")
@debug_option
def plot(run_dirs, out, debug):
    """Training and validation perplexity of one or more runs, against steps and against time."""
    from lmtrain.plots import HOW_TO_PLOT, plot_runs, run_curves

    for run in run_dirs:
        c = run_curves(run)
        last = c["valid"][-1] if c["valid"] else None
        click.echo(
            f"{run}: {len(c['train'])} train and {len(c['valid'])} valid points"
            + (f"; last valid ppl {last[2]:.2f} at step {last[0]} ({last[1]:.0f} s)" if last else "")
            + (f"; test ppl {c['test']:.2f}" if c["test"] else "")
        )
    if plot_runs(run_dirs, out) is None:
        raise LmtrainError(f"no plot written: {HOW_TO_PLOT}")
    click.echo(f"plot written to {out}")


@cli.command()
@click.option("--ckpt", type=click.Path(), help="Checkpoint (default: best.npz of the latest run under runs/).")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=30, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), help="Sample from the K most likely words only.")
@click.option(
    "--top-p",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="Sample from the smallest set of words whose probability reaches P.",
)
@click.option("--greedy", is_flag=True, help="Always take the most likely word.")
@click.option("--seed", type=int, help="Seed of the sampler.")
@click.option("--show-top", type=click.IntRange(min=0), default=0, help="Print the K most likely next words.")
@debug_option
def generate(ckpt, prompt, max_tokens, temperature, top_k, top_p, greedy, seed, show_top, debug):
    """Continue a prompt with a trained model."""
    if greedy and (top_k or top_p or seed is not None):
        raise LmtrainError(
            "--greedy takes the most likely word: --top-k, --top-p and --seed choose how to sample, "
            "which --greedy does not"
        )
    out = commands.generate(
        ckpt,
        prompt,
        lambda line: click.echo(line, err=True),
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        seed=seed,
        show_top=show_top,
    )
    if out["unknown"]:
        click.echo(f"note: not in the vocabulary, read as <unk>: {', '.join(out['unknown'])}", err=True)
    if out["top"]:
        click.echo("most likely next words:")
        width = max(len(w) for w, _ in out["top"])
        for word, p in out["top"]:
            click.echo(f"  {word:<{width}}  {p:.4f}")
    click.echo(out["text"])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        rv = cli.main(args=argv, prog_name="lmtrain", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except click.ClickException as err:  # bad arguments: click's message on one line
        if debug:
            raise
        where = f" (see '{err.ctx.command_path} --help')" if getattr(err, "ctx", None) else ""
        click.echo(f"error: {err.format_message()}{where}", err=True)
        sys.exit(err.exit_code)
    except (click.Abort, KeyboardInterrupt):  # Ctrl-C before training started: nothing to save
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except LmtrainError as err:
        if debug:
            raise
        _fail(f"{err}", err.exit_code, collective=isinstance(err, CollectiveError), stopped=_stopped(err))
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        _fail(f"{type(err).__name__}: {first} (run with --debug for the traceback)", 1)


def _stopped(err):
    """Whether ``err`` is a run's orderly stop for a signal (its checkpoint saved): not an error."""
    from lmtrain.training.control import Interrupted

    return isinstance(err, Interrupted)


def _fail(message, code, collective=False, stopped=False):
    """Print ``error: message`` (``stopped``: the message alone, an orderly stop for a signal) and exit.
    Among MPI ranks, an error every rank raised together is printed once (by rank 0); one rank's own error
    is printed with its rank and ends the whole job, since the other ranks would wait for it forever."""
    if stopped:
        # Exiting for that signal: another copy of it (a job scheduler signals every process of a job) must not
        # cut the exit short, and Python restores the default handlers while it shuts down.
        signal.signal(code - 128, signal.SIG_IGN)
    prefix = "" if stopped else "error: "
    world = current_world()
    if world is None or world.size == 1:
        click.echo(f"{prefix}{message}", err=True)
        sys.exit(code)
    if collective:
        if world.is_main:
            click.echo(f"{prefix}{message}", err=True)
        world.barrier()  # as at a normal end: rank 0 has written and printed before any rank leaves
        sys.exit(code)
    click.echo(f"error: rank {world.rank}: {message}; stopping all {world.size} ranks", err=True)
    world.abort(code)
