"""Command line: parse, call, print.  Every user error is one line and a non-zero exit."""
import glob
import json
import os
import sys

import click

from lmtrain import __version__
from lmtrain.errors import LmtrainError


def _debug_requested(argv):
    return "--debug" in argv or os.environ.get("LMTRAIN_DEBUG") == "1"


debug_option = click.option("--debug", is_flag=True, help="Show the full traceback of an error.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmtrain")
@debug_option
def cli(debug):
    """Train, evaluate and sample word-level LSTM language models in numpy."""


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
    """Train the model CONFIG (a YAML file) describes."""
    import shlex

    from lmtrain.config import load_config
    from lmtrain.train import fit as run_fit

    if resume and overwrite:
        raise LmtrainError("--resume and --overwrite contradict each other; choose one")
    cfg = load_config(config, overrides)
    hint = " ".join(["lmtrain fit", shlex.quote(config), *(f"--set {shlex.quote(o)}" for o in overrides),
                     *([f"--run-dir {shlex.quote(run_dir)}"] if run_dir else []), "--resume"])
    run_dir = run_dir or os.path.join(cfg.output.dir, cfg.output.name)
    run_fit(cfg, run_dir, overwrite=overwrite, resume=resume, quiet=quiet, echo=click.echo, resume_hint=hint)


@cli.command("eval")
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (.npz) to evaluate.")
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="Split of the checkpoint's corpus.")
@click.option("--text", "text_file", type=click.Path(), help="Evaluate on this text file instead of a split.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Parallel streams (default: the run's train.eval_batch_size).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def eval_cmd(ckpt, split, text_file, batch_size, as_json, debug):
    """Perplexity of a checkpoint over a whole split or file."""
    from lmtrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lmtrain.data.corpus import read_tokens
    from lmtrain.data.sources import load_corpus
    from lmtrain.train import evaluate

    model, vocab, cfg = model_from_checkpoint(load_checkpoint(ckpt))
    if text_file:
        ids = vocab.encode(read_tokens(text_file, "text file", vocab.lowercase))
        if len(ids) < 2:
            raise LmtrainError(f"text file {text_file} has too few tokens to evaluate")
        source = text_file
    else:
        quiet = lambda *a, **k: None  # noqa: E731  keep stdout clean for --json
        ids = load_corpus(cfg.data, log=quiet if as_json else click.echo).split(split)
        source = split
    batch_size = batch_size or cfg.train.eval_batch_size
    loss, ppl, count = evaluate(model, ids, batch_size, cfg.train.bptt)
    if as_json:
        click.echo(json.dumps({"ckpt": ckpt, "split": source, "loss": loss, "ppl": ppl, "tokens": count,
                               "batch_size": batch_size}))
    else:
        click.echo(f"{source} perplexity {ppl:.2f} (loss {loss:.4f}) over {count:,} tokens, batch size "
                   f"{batch_size}, checkpoint {ckpt}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Training windows per timed repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repeats after warm-up; medians are reported.")
@click.option("--vocab-size", type=click.IntRange(min=3), default=10000, show_default=True,
              help="Vocabulary of the synthetic token ids.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def bench(config, overrides, steps, repeats, vocab_size, as_json, debug):
    """Time training, evaluation and generation of CONFIG's model on this machine."""
    from lmtrain.bench import format_report, run_bench
    from lmtrain.config import load_config

    report = run_bench(load_config(config, overrides), steps=steps, repeats=repeats, vocab_size=vocab_size)
    click.echo(json.dumps(report) if as_json else format_report(report))


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
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        click.echo(f"error: {type(err).__name__}: {first} (run with --debug for the traceback)", err=True)
        sys.exit(1)
