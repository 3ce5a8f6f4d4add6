"""Command line: parse, call, print.  Every user error is one line and a non-zero exit."""
import glob
import json
import os
import sys

import click

from lmtrain import __version__
from lmtrain.config import load_config
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


def _start_world():
    """This process's place among the ranks of an MPI job (a world of one without a launcher)."""
    from lmtrain.world import get_world, supervise_rank
    supervise_rank(lambda line: click.echo(line, err=True))
    return get_world()


def _set_threads(world, cfg):
    """train.threads_per_rank, or under MPI the cores shared among the ranks of each node; and train.kernels."""
    from lmtrain.backend import use_kernels
    use_kernels(cfg.train.kernels)
    if world.size > 1 or cfg.train.threads_per_rank:
        from lmtrain.backend import set_threads
        from lmtrain.world import threads_per_rank
        set_threads(threads_per_rank(world, cfg.train.threads_per_rank))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.lr=0.5 (repeatable).")
@click.option("--run-dir", type=click.Path(), help="Run directory (default: output.dir/output.name).")
@click.option("--resume", is_flag=False, flag_value="last", default=None, metavar="[PATH]",
              help="Continue the run from its last.npz, or from the checkpoint PATH.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the run directory.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary lines.")
@debug_option
def fit(config, overrides, run_dir, resume, overwrite, quiet, debug):
    """Train the model CONFIG (a YAML file) describes.

    Under an MPI launcher (mpiexec -n K lmtrain fit CONFIG) the K processes
    train together, data-parallel: see docs/scaling.md.
    """
    import shlex

    if resume and overwrite:
        raise LmtrainError("--resume and --overwrite contradict each other; choose one")
    world = _start_world()
    cfg = world.on_every_rank(lambda: load_config(config, overrides))
    _set_threads(world, cfg)
    from lmtrain.train import fit as run_fit

    launcher = "mpiexec -n {} ".format(world.size) if world.size > 1 else ""
    hint = " ".join([f"{launcher}lmtrain fit", shlex.quote(config), *(f"--set {shlex.quote(o)}" for o in overrides),
                     *([f"--run-dir {shlex.quote(run_dir)}"] if run_dir else []), "--resume"])
    run_dir = run_dir or os.path.join(cfg.output.dir, cfg.output.name)
    run_fit(cfg, run_dir, overwrite=overwrite, resume=resume, quiet=quiet, echo=click.echo, resume_hint=hint,
            world=world)
    world.barrier()  # no rank leaves while rank 0 still writes (a launcher may stop the job when one ends)


def _load_for_eval(ckpt, as_json):
    """(checkpoint, model, vocab, config, corpus loader) of a checkpoint to evaluate."""
    from lmtrain.backend import use_kernels
    from lmtrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lmtrain.data.sources import load_corpus

    loaded = load_checkpoint(ckpt)
    model, vocab, cfg = model_from_checkpoint(loaded)
    use_kernels(cfg.train.kernels)
    quiet = lambda *a, **k: None  # noqa: E731  keep stdout clean for --json
    return loaded, model, vocab, cfg, lambda: load_corpus(cfg.data, log=quiet if as_json else click.echo)


def _dyn_stats(loaded, model, cfg, corpus, as_json):
    from lmtrain.adapt import gradient_stats
    return gradient_stats(model, corpus.train, cfg.train.bptt, loaded.path, loaded.sha256,
                          echo=(lambda *a: None) if as_json else click.echo)


@cli.command("eval")
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (.npz) to evaluate.")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="Split of the checkpoint's corpus.")
@click.option("--text", "text_file", type=click.Path(), help="Evaluate on this text file instead of a split.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Parallel streams (default: the run's train.eval_batch_size; 1 with --cache or --dynamic).")
@click.option("--cache", is_flag=True, help="Add the neural cache (Grave et al. 2017) over recent hidden states.")
@click.option("--cache-window", type=click.IntRange(min=1), default=500, show_default=True,
              help="Cache: pairs (hidden state, next word) kept, the latest N.")
@click.option("--cache-theta", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Cache: sharpness of the match between hidden states.")
@click.option("--cache-lambda", type=click.FloatRange(0, 1), default=0.15, show_default=True,
              help="Cache: its weight in the mixture with the model.")
@click.option("--dynamic", is_flag=True, help="Add dynamic evaluation (Krause et al. 2018): adapt the weights "
              "to each segment after scoring it.")
@click.option("--dyn-lr", type=click.FloatRange(min=0), default=3e-4, show_default=True,
              help="Dynamic evaluation: step size of the RMS-normalised update.")
@click.option("--dyn-decay", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Dynamic evaluation: pull back towards the trained weights, per step.")
@click.option("--dyn-segment", type=click.IntRange(min=1), default=5, show_default=True,
              help="Dynamic evaluation: tokens scored between two updates.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def eval_cmd(ckpt, split, text_file, batch_size, cache, cache_window, cache_theta, cache_lambda, dynamic, dyn_lr,
             dyn_decay, dyn_segment, as_json, debug):
    """Perplexity of a checkpoint over a whole split or file; with --cache and/or --dynamic, beside the
    base perplexity of the same stream (batch 1), each method's (docs/evaluation.md)."""
    import time

    from lmtrain.data.corpus import encode_file
    from lmtrain.train import evaluate

    if (cache or dynamic) and batch_size not in (None, 1):
        raise LmtrainError("--cache and --dynamic read the split as one stream: --batch-size must be 1")
    loaded, model, vocab, cfg, corpus_of = _load_for_eval(ckpt, as_json)
    corpus = None
    if text_file:
        ids = encode_file(text_file, vocab)
        if len(ids) < 2:
            raise LmtrainError(f"text file {text_file} has too few tokens to evaluate")
        source = text_file
    else:
        corpus = corpus_of()
        ids, source = corpus.split(split), split
    if not (cache or dynamic):
        batch_size = batch_size or cfg.train.eval_batch_size
        t0 = time.perf_counter()
        loss, ppl, count = evaluate(model, ids, batch_size, cfg.train.bptt)
        if as_json:
            click.echo(json.dumps({"ckpt": ckpt, "split": source, "loss": loss, "ppl": ppl, "tokens": count,
                                   "batch_size": batch_size, "seconds": round(time.perf_counter() - t0, 2)}))
        else:
            click.echo(f"{source} perplexity {ppl:.2f} (loss {loss:.4f}) over {count:,} tokens, batch size "
                       f"{batch_size}, checkpoint {ckpt}")
        return

    from lmtrain import adapt
    cache_settings = dict(window=cache_window, theta=cache_theta, lam=cache_lambda) if cache else None
    dyn_settings = dict(lr=dyn_lr, decay=dyn_decay, segment=dyn_segment) if dynamic else None
    ms = _dyn_stats(loaded, model, cfg, corpus or corpus_of(), as_json) if dynamic else None
    window = dyn_segment if dynamic else cfg.train.bptt
    results = adapt.run(model, ids, window, cache_settings, dyn_settings, ms)
    if as_json:
        click.echo(json.dumps({"ckpt": ckpt, "split": source, "tokens": results["base"]["tokens"], "batch_size": 1,
                               "window": window, "cache": cache_settings, "dynamic": dyn_settings,
                               "results": results}))
        return
    base = results["base"]["ppl"]
    click.echo(f"{source}, {results['base']['tokens']:,} tokens, one stream, checkpoint {ckpt}")
    for name, r in results.items():
        change = "" if name == "base" else f"  ({100 * (r['ppl'] / base - 1):+.1f}%)"
        click.echo(f"  {name:<14} perplexity {r['ppl']:8.2f}{change}   {r['seconds']:.0f} s")


@cli.command("tune-eval")
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (.npz) to tune for.")
@click.option("--method", required=True, type=click.Choice(["cache", "dynamic"]), help="Method to tune.")
@click.option("--tokens", type=click.IntRange(min=100),
              help="Tune on the first N tokens of the validation split (default: all of it).")
@click.option("--dyn-segment", type=click.IntRange(min=1), default=5, show_default=True,
              help="Dynamic evaluation: tokens scored between two updates.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def tune_eval(ckpt, method, tokens, dyn_segment, as_json, debug):
    """Search the settings of --cache or --dynamic on the validation split (the test split is never read)
    and print the command that applies the best ones to the test split."""
    import math
    import shlex
    import time

    from lmtrain import adapt

    loaded, model, vocab, cfg, corpus_of = _load_for_eval(ckpt, as_json)
    corpus = corpus_of()
    valid = corpus.valid[:tokens] if tokens else corpus.valid
    t0 = time.perf_counter()
    if method == "cache":
        rows, base = adapt.tune_cache(model, valid, cfg.train.bptt)
        best = rows[0]
        flags = f"--cache --cache-window {best['window']} --cache-theta {best['theta']:g} --cache-lambda {best['lam']:g}"
    else:
        ms = _dyn_stats(loaded, model, cfg, corpus, as_json)
        rows, base = adapt.tune_dynamic(model, valid, dyn_segment, ms)
        best = rows[0]
        flags = f"--dynamic --dyn-lr {best['lr']:g} --dyn-decay {best['decay']:g} --dyn-segment {dyn_segment}"
    command = f"lmtrain eval --ckpt {shlex.quote(ckpt)} --split test {flags}"
    if as_json:
        click.echo(json.dumps({"ckpt": ckpt, "method": method, "split": "valid", "tokens": len(valid) - 1,
                               "base_ppl": base, "best": best, "command": command,
                               # a diverged trial's perplexity (NaN) as null: NaN is not JSON
                               "trials": [{**r, "ppl": r["ppl"] if math.isfinite(r["ppl"]) else None} for r in rows],
                               "seconds": round(time.perf_counter() - t0, 1)}))
        return
    click.echo(f"{method} on validation ({len(valid) - 1:,} tokens, one stream): base perplexity {base:.2f}")
    for r in rows[:5]:
        click.echo("  " + "  ".join(f"{k} {v:g}" for k, v in r.items() if k != "ppl")
                   + (f"  ->  {r['ppl']:.2f}" if math.isfinite(r["ppl"]) else "  ->  diverged"))
    click.echo(f"best: {base:.2f} -> {best['ppl']:.2f} ({100 * (best['ppl'] / base - 1):+.1f}%), "
               f"{len(rows)} settings tried in {time.perf_counter() - t0:.0f} s; on the test split:\n  {command}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@debug_option
def prepare(config, overrides, debug):
    """Download CONFIG's corpus if needed and tokenise it into data/cache/ (fit does this by itself when
    the prepared files are missing; a second prepare finds them and does nothing)."""
    from lmtrain.data.sources import load_corpus

    cfg = load_config(config, overrides)
    if cfg.data.source == "synthetic":
        click.echo("data.source synthetic is generated in memory by every run: nothing to prepare")
        return
    if not cfg.data.cache:
        raise LmtrainError(f"data.cache is false in {config}: runs tokenise into memory and keep nothing; "
                           f"set data.cache: true to prepare the corpus once")
    click.echo(load_corpus(cfg.data, log=click.echo).describe())


@cli.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Training windows per timed repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repeats after warm-up; medians are reported.")
@click.option("--vocab-size", type=click.IntRange(min=3), default=10000, show_default=True,
              help="Vocabulary of the synthetic token ids.")
@click.option("--layers", is_flag=True, help="Also time each layer's forward and backward: where a window's time goes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def bench(config, overrides, steps, repeats, vocab_size, layers, as_json, debug):
    """Time training, evaluation and generation of CONFIG's model on this machine (under mpiexec: with
    every rank training its share of the batch, and the Allreduce of the gradients timed too)."""
    world = _start_world()
    cfg = world.on_every_rank(lambda: load_config(config, overrides))
    _set_threads(world, cfg)
    from lmtrain.bench import format_report, run_bench

    report = run_bench(cfg, steps=steps, repeats=repeats, vocab_size=vocab_size, world=world, layers=layers)
    if world.is_main:
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


def _labels(models):
    """A label for each (config, path): the cell and run name, with the seed where runs share a name."""
    from collections import Counter
    base = [f"{cfg.model.cell} ({cfg.output.name or os.path.basename(path)}" for cfg, path in models]
    labels = [f"{b}, seed {cfg.seed})" if base.count(b) > 1 else f"{b})" for b, (cfg, _) in zip(base, models)]
    twice = Counter(labels)
    return [f"{label} [{path}]" if twice[label] > 1 else label for label, (_, path) in zip(labels, models)]


def _seed_summary(results, configs, value):
    """{group label: {"members": [...], "min": [...], "median": [...], "max": [...]}} over the models that
    differ only in their seed (groups of two or more); ``value(rows)`` gives the numbers of one model."""
    from lmtrain.probes import seed_groups
    import numpy as np
    out = {}
    for name, members in seed_groups(configs).items():
        if len(members) > 1:
            values = np.array([value(results[m]) for m in members])
            out[name] = {"members": members, "min": values.min(axis=0).tolist(),
                         "median": np.median(values, axis=0).tolist(), "max": values.max(axis=0).tolist()}
    return out


def _say_plot(written, path):
    from lmtrain.plots import HOW_TO_PLOT
    click.echo(f"plot written to {path}" if written else f"(no plot: {HOW_TO_PLOT})")


@cli.group()
def probe():
    """Measure what a model remembers and how far its gradients reach back."""


@probe.command("recall")
@click.option("--ckpt", "ckpts", required=True, multiple=True, type=click.Path(),
              help="Checkpoint of a model trained on the built-in stories (repeat to compare models).")
@click.option("--distances", default="5,10,20,40,80", show_default=True, help="Comma-separated distances.")
@click.option("--stories", type=click.IntRange(min=1), default=200, show_default=True,
              help="Held-out stories per distance.")
@click.option("--mode", type=click.Choice(["stream", "prompt"]), default="stream", show_default=True,
              help="stream: stories in sequence, state carried (as trained); prompt: each alone from an "
                   "empty state (as generate).")
@click.option("--plot", "plot_path", default="recall.png", show_default=True, help="PNG to write.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def probe_recall(ckpts, distances, stories, mode, plot_path, as_json, debug):
    """Accuracy of the name after "said hi to", per distance, on held-out stories."""
    from lmtrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lmtrain.plots import plot_recall
    from lmtrain.probes import recall

    distances = _distances(distances)
    models = [model_from_checkpoint(load_checkpoint(path)) for path in ckpts]
    results, configs = {}, {}
    for label, (model, vocab, cfg) in zip(_labels([(m[2], p) for m, p in zip(models, ckpts)]), models):
        results[label], configs[label] = recall(model, vocab, cfg, distances, stories, mode), cfg
    accuracy = lambda rows: [r["accuracy"] for r in rows]  # noqa: E731
    seeds = _seed_summary(results, configs, accuracy)
    chance = next(iter(results.values()))[0]["chance"]
    if as_json:
        click.echo(json.dumps({"distances": distances, "models": {k: {"ckpt": p, "accuracy": accuracy(v)}
                                                                  for (k, v), p in zip(results.items(), ckpts)},
                               "seeds": seeds, "stories": stories, "mode": mode, "chance": chance}))
    else:
        rows = [(label, accuracy(v)) for label, v in results.items()]
        for name, g in seeds.items():
            rows += [(f"{name}: min", g["min"]), (f"{name}: median", g["median"])]
        width = max(len(label) for label, _ in rows)
        click.echo(f"{'distance':>{width}} " + " ".join(f"{d:>7}" for d in distances))
        for label, values in rows:
            click.echo(f"{label:>{width}} " + " ".join(f"{v:>7.3f}" for v in values))
        click.echo(f"{stories} held-out stories per distance, read in {mode} mode; chance {chance:.3f}"
                   + ("; min and median over the seeds of each model" if seeds else ""))
    written = plot_recall(results, plot_path, seeds)
    if not as_json:
        _say_plot(written, plot_path)


@probe.command("gradflow")
@click.option("--ckpt", "ckpts", multiple=True, type=click.Path(), help="Checkpoint (repeat to compare models).")
@click.option("--config", "configs", multiple=True, type=click.Path(),
              help="With --init-only: probe a freshly initialised model of this config (repeatable).")
@click.option("--init-only", is_flag=True, help="Probe models at initialisation, from --config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of every --config, e.g. --set data.root=data/ptb.")
@click.option("--seeds", help="With --init-only: probe each --config at each of these seeds, e.g. 0,1,2.")
@click.option("--steps", type=click.IntRange(min=2), default=100, show_default=True,
              help="Largest k: how many steps back.")
@click.option("--batches", type=click.IntRange(min=1), default=10, show_default=True,
              help="Windows averaged over.")
@click.option("--split", type=click.Choice(["valid", "test", "train"]), default="valid", show_default=True,
              help="Data the windows come from.")
@click.option("--plot", "plot_path", default="gradflow.png", show_default=True, help="PNG to write.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def probe_gradflow(ckpts, configs, init_only, overrides, seeds, steps, batches, split, plot_path, as_json, debug):
    """Gradient norm at the state k steps before a loss, for k = 0..steps, and its per-step decay."""
    from lmtrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lmtrain.data.sources import load_corpus
    from lmtrain.nn.model import LanguageModel
    from lmtrain.plots import plot_gradflow
    from lmtrain.probes import decay_rate, gradflow

    if init_only and (ckpts or not configs):
        raise LmtrainError("--init-only probes fresh models: give --config CONFIG (and no --ckpt)")
    if not init_only and (configs or not ckpts):
        raise LmtrainError("give --ckpt PATH, or --init-only with --config CONFIG")
    if seeds and not init_only:
        raise LmtrainError("--seeds sets the seeds of fresh models (--init-only); a checkpoint has its own")
    quiet = lambda *a, **k: None  # noqa: E731
    models = []
    for path in ckpts:
        model, vocab, cfg = model_from_checkpoint(load_checkpoint(path), dtype="float64")
        models.append((path, model, cfg, load_corpus(cfg.data, log=quiet)))
    for path in configs:
        for seed in _distances(seeds) if seeds else [None]:
            cfg = load_config(path, [*overrides, *([f"seed={seed}"] if seed is not None else [])])
            corpus = load_corpus(cfg.data, log=quiet)
            models.append((path, LanguageModel(cfg.model, len(corpus.vocab), seed=cfg.seed, dtype="float64"), cfg,
                           corpus))
    results, rates, cfgs = {}, {}, {}
    for label, (path, model, cfg, corpus) in zip(_labels([(m[2], m[0]) for m in models]), models):
        results[label] = gradflow(model, corpus.split(split), steps=steps, batches=batches)
        rates[label], cfgs[label] = {state: decay_rate(v) for state, v in results[label].items()}, cfg
    spread = _seed_summary(rates, cfgs, lambda r: list(r.values()))
    when = "at initialisation" if init_only else "trained"
    if as_json:
        click.echo(json.dumps({"steps": list(range(steps + 1)), "split": split, "batches": batches, "when": when,
                               "models": {k: {"norms": {s: list(map(float, v)) for s, v in n.items()},
                                              "decay_per_step": rates[k]} for k, n in results.items()},
                               "seeds": {name: dict(g, states=list(rates[g["members"][0]]))
                                         for name, g in spread.items()}}))
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
            click.echo(f"{name}: per-step log-decay, median (range) " + ", ".join(
                f"d/d{s} {g['median'][i]:+.4f} ({g['min'][i]:+.4f} .. {g['max'][i]:+.4f})"
                for i, s in enumerate(states)))
    written = plot_gradflow(results, plot_path, title=f"models {when}")
    if not as_json:
        _say_plot(written, plot_path)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="curves.png", show_default=True, help="PNG to write.")
@debug_option
def plot(run_dirs, out, debug):
    """Training and validation perplexity of one or more runs, against steps and against time."""
    from lmtrain.plots import plot_runs, run_curves

    for run in run_dirs:
        c = run_curves(run)
        last = c["valid"][-1] if c["valid"] else None
        click.echo(f"{run}: {len(c['train'])} train and {len(c['valid'])} valid points"
                   + (f"; last valid ppl {last[2]:.2f} at step {last[0]} ({last[1]:.0f} s)" if last else "")
                   + (f"; test ppl {c['test']:.2f}" if c["test"] else ""))
    _say_plot(plot_runs(run_dirs, out), out)


def latest_checkpoint(root="runs"):
    found = glob.glob(os.path.join(root, "*", "checkpoints", "best.npz"))
    if not found:
        raise LmtrainError(f"no --ckpt given and no checkpoint under {root}/; train one with "
                           f"'lmtrain fit CONFIG' or pass --ckpt PATH")
    return max(found, key=os.path.getmtime)


@cli.command()
@click.option("--ckpt", type=click.Path(), help="Checkpoint (default: best.npz of the latest run under runs/).")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=30, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), help="Sample from the K most likely words only.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Sample from the smallest set of words whose probability reaches P.")
@click.option("--greedy", is_flag=True, help="Always take the most likely word.")
@click.option("--seed", type=int, help="Seed of the sampler.")
@click.option("--show-top", type=click.IntRange(min=0), default=0, help="Print the K most likely next words.")
@debug_option
def generate(ckpt, prompt, max_tokens, temperature, top_k, top_p, greedy, seed, show_top, debug):
    """Continue a prompt with a trained model."""
    from lmtrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lmtrain.generate import generate as run_generate
    from lmtrain.generate import render

    if not prompt.strip():
        raise LmtrainError("the prompt is empty; give at least one word, e.g. --prompt \"the market\"")
    if ckpt is None:
        ckpt = latest_checkpoint()
        click.echo(f"using {ckpt}", err=True)
    model, vocab, _ = model_from_checkpoint(load_checkpoint(ckpt))
    out = run_generate(model, vocab, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, greedy=greedy, seed=seed, show_top=show_top)
    if out["unknown"]:
        click.echo(f"note: not in the vocabulary, read as <unk>: {', '.join(out['unknown'])}", err=True)
    if out["top"]:
        click.echo("most likely next words:")
        width = max(len(w) for w, _ in out["top"])
        for word, p in out["top"]:
            click.echo(f"  {word:<{width}}  {p:.4f}")
    click.echo(render(out["prompt_tokens"] + out["continuation"]))


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
        _fail(f"{err}", err.exit_code, collective=isinstance(err, CollectiveError))
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        _fail(f"{type(err).__name__}: {first} (run with --debug for the traceback)", 1)


def _fail(message, code, collective=False):
    """Print ``error: message`` and exit.  Among MPI ranks, an error every rank raised together is
    printed once (by rank 0); one rank's own error is printed with its rank and ends the whole job,
    since the other ranks would wait for it forever."""
    world = current_world()
    if world is None or world.size == 1:
        click.echo(f"error: {message}", err=True)
        sys.exit(code)
    if collective:
        if world.is_main:
            click.echo(f"error: {message}", err=True)
        world.barrier()  # as at a normal end: rank 0 has written and printed before any rank leaves
        sys.exit(code)
    click.echo(f"error: rank {world.rank}: {message}; stopping all {world.size} ranks", err=True)
    world.abort(code)
