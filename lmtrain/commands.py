"""What each command of the CLI does, behind its arguments: lmtrain/cli.py parses, calls one of these,
and prints what it returns.  These set up the process (the MPI world, threads), load configs and
checkpoints, build models and call the parts that do the work."""

import glob
import math
import os
import shlex
import time

import numpy as np

from lmtrain.build import build_model, model_from_checkpoint
from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import load_config
from lmtrain.errors import DataError, LmtrainError

NO_OUTPUT = lambda *a, **k: None  # noqa: E731


def start_world(echo):
    """This process's place among the ranks of an MPI job (a world of one without a launcher)."""
    from lmtrain.world import get_world, supervise_rank

    supervise_rank(echo)
    return get_world()


def set_threads(world, cfg):
    """train.threads_per_rank, or under MPI the cores shared among the ranks of each node."""
    if world.size > 1 or cfg.train.threads_per_rank:
        from lmtrain.threads import set_threads as set_count
        from lmtrain.world import threads_per_rank

        set_count(threads_per_rank(world, cfg.train.threads_per_rank))


def fit(config, overrides, run_dir, resume, overwrite, quiet, echo, err_echo):
    """`lmtrain fit`: train, every rank together; returns the world (the CLI waits on it before leaving)."""
    from lmtrain.build import path
    from lmtrain.training import fit as run_fit

    if resume and overwrite:
        raise LmtrainError("--resume and --overwrite contradict each other; choose one")
    config, run_dir, resume = what_to_fit(config, overrides, run_dir, resume)
    world = start_world(err_echo)
    cfg = world.on_every_rank(lambda: load_config(config, overrides))
    set_threads(world, cfg)
    world.on_every_rank(lambda: path(cfg.train.kernels))  # a bad setting fails before any work
    run_dir = run_dir or os.path.join(cfg.output.dir, cfg.output.name)
    launcher = f"mpiexec -n {world.size} " if world.size > 1 else ""
    hint = f"{launcher}lmtrain fit --resume {shlex.quote(run_dir)}"
    run_fit(cfg, run_dir, overwrite=overwrite, resume=resume, quiet=quiet, echo=echo, resume_hint=hint, world=world)
    return world


def what_to_fit(config, overrides, run_dir, resume):
    """(config file, run directory or None, resume): CONFIG is a file or a preset's name; `--resume RUN_DIR`
    (or CONFIG naming a run directory, with --resume) continues that run from its own config.yaml, with --set
    only for the keys that may change on resume."""
    from lmtrain.config import SAFE_TO_CHANGE_ON_RESUME, parse_override

    directory = config if config and os.path.isdir(config) and resume else None
    if config is None:
        if not (resume and os.path.isdir(resume)):
            raise LmtrainError(
                "give a CONFIG (a file or a preset's name: lmtrain presets), or --resume RUN_DIR to continue a run"
            )
        directory, resume = resume, "last"
    if directory is None:
        return config, run_dir, resume
    if not os.path.isfile(os.path.join(directory, "config.yaml")):
        raise LmtrainError(f"{directory} is not a run directory (it has no config.yaml)")
    if run_dir and os.path.abspath(run_dir) != os.path.abspath(directory):
        raise LmtrainError(
            f"--resume {directory} continues the run in that directory; --run-dir {run_dir} names another"
        )
    unsafe = [o for o in overrides if ".".join(parse_override(o)[0]) not in SAFE_TO_CHANGE_ON_RESUME]
    if unsafe:
        raise LmtrainError(
            f"--set {unsafe[0]}: a run continues with its own config; only "
            f"{', '.join(sorted(SAFE_TO_CHANGE_ON_RESUME))} may change"
        )
    return os.path.join(directory, "config.yaml"), directory, resume


def load_for_eval(ckpt, log=print, dtype=None, kernels=None):
    """(checkpoint, model, vocab, config, corpus loader) of a checkpoint to evaluate; the corpus is the one its
    data settings name, refused when it does not give the vocabulary the model was trained on."""
    loaded = load_checkpoint(ckpt)
    model, vocab, cfg = model_from_checkpoint(loaded, dtype=dtype, kernels=kernels)
    return loaded, model, vocab, cfg, lambda: corpus_of_checkpoint(loaded.path, cfg, vocab, log)


def corpus_of_checkpoint(path, cfg, vocab, log):
    """The corpus of a checkpoint's data settings, checked against the vocabulary it holds: ids from another
    vocabulary would give a wrong perplexity silently (or index past the embedding)."""
    from lmtrain.data.sources import load_corpus
    from lmtrain.data.vocab import vocab_difference

    corpus = load_corpus(cfg.data, log=log)
    difference = vocab_difference(vocab, corpus.vocab)
    if difference:
        raise LmtrainError(
            f"the corpus of {path}'s data settings now gives another vocabulary than the one the "
            f"model was trained on ({difference}): its files changed since; restore them, or "
            f"evaluate a file with --text"
        )
    return corpus


def dynamic_stats(loaded, model, cfg, corpus, log):
    from lmtrain.adapt import gradient_stats

    return gradient_stats(model, corpus.train, cfg.train.bptt, loaded.path, loaded.sha256, echo=log)


def evaluate(ckpt, split, text_file, batch_size, cache, dynamic, log):
    """`lmtrain eval`, as the JSON object it prints: the perplexity of plain evaluation (with bits per word and
    the share of <unk>), or with the cache or dynamic evaluation {"results": {method: {ppl, loss, bits_per_word,
    seconds, tokens}}}.  ``cache``: dict(window, theta, lam) or None; ``dynamic``: dict(lr, decay, segment) or
    None."""
    from lmtrain.data.corpus import unk_share
    from lmtrain.evaluation import evaluate as run_evaluate

    if text_file and split:
        raise LmtrainError(
            "--split names a split of the checkpoint's corpus and --text a file to evaluate instead: give one of them"
        )
    if (cache or dynamic) and batch_size not in (None, 1):
        raise LmtrainError("--cache and --dynamic read the split as one stream: --batch-size must be 1")
    loaded, model, vocab, cfg, corpus_of = load_for_eval(ckpt, log)
    ids, source, corpus = ids_to_evaluate(text_file, split or "test", vocab, cfg, corpus_of, log)
    head = {"ckpt": ckpt, "split": source, "unk": unk_share(ids, vocab)}
    if not (cache or dynamic):
        batch_size = batch_size or cfg.train.eval_batch_size
        t0 = time.perf_counter()
        r = run_evaluate(model, ids, batch_size, cfg.train.bptt)
        return {
            **head,
            "loss": r.loss,
            "ppl": r.ppl,
            "bits_per_word": r.loss / math.log(2),
            "tokens": r.tokens,
            "batch_size": batch_size,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    from lmtrain import adapt

    ms = dynamic_stats(loaded, model, cfg, corpus or corpus_of(), log) if dynamic else None
    window = dynamic["segment"] if dynamic else cfg.train.bptt
    results = adapt.run(model, ids, window, cache, dynamic, ms)
    for r in results.values():
        r["bits_per_word"] = r["loss"] / math.log(2)
    return {
        **head,
        "tokens": results["base"]["tokens"],
        "batch_size": 1,
        "window": window,
        "cache": cache,
        "dynamic": dynamic,
        "results": results,
    }


def ids_to_evaluate(text_file, split, vocab, cfg, corpus_of, log):
    """(ids, what they are, the corpus or None): a text file read with the checkpoint's vocabulary, or a split
    of the checkpoint's corpus.  Where the corpus cannot be rebuilt (its training files moved) but the split's
    own files are there, those are read with the checkpoint's vocabulary, which is what a model needs."""
    from lmtrain.data.corpus import encode_file

    if text_file:  # every token of the file scored: the first after an <eos>, as every line's first word is
        words = encode_file(text_file, vocab)
        if len(words) < 1:
            raise LmtrainError(f"text file {text_file} has no tokens to evaluate")
        return np.concatenate([np.array([vocab.eos_id], words.dtype), words]), text_file, None
    try:
        corpus = corpus_of()
    except DataError as err:
        d = cfg.data
        paths = getattr(d, split) if d.source == "text" else None
        paths = [paths] if isinstance(paths, str) else paths
        if not paths or not all(os.path.isfile(p) for p in paths):
            raise
        log(
            f"note: {str(err).splitlines()[0]}; the {split} split is read from {', '.join(paths)} with the "
            f"checkpoint's vocabulary"
        )
        return np.concatenate([encode_file(p, vocab) for p in paths]), split, None
    return corpus.split(split), split, corpus


def tune(ckpt, method, tokens, dyn_segment, log):
    """`lmtrain tune-eval`: the search on the validation split; returns its rows (best first), the base
    perplexity, the flags of the best and the command that applies them to the test split."""
    from lmtrain import adapt

    loaded, model, vocab, cfg, corpus_of = load_for_eval(ckpt, log)
    corpus = corpus_of()
    valid = corpus.valid[:tokens] if tokens else corpus.valid
    t0 = time.perf_counter()
    if method == "cache":
        rows, base = adapt.tune_cache(model, valid, cfg.train.bptt)
        best = rows[0]
        flags = (
            f"--cache --cache-window {best['window']} --cache-theta {best['theta']:g} --cache-lambda {best['lam']:g}"
        )
    else:
        ms = dynamic_stats(loaded, model, cfg, corpus, log)
        rows, base = adapt.tune_dynamic(model, valid, dyn_segment, ms)
        best = rows[0]
        flags = f"--dynamic --dyn-lr {best['lr']:g} --dyn-decay {best['decay']:g} --dyn-segment {dyn_segment}"
    return {
        "rows": rows,
        "base": base,
        "best": best,
        "tokens": len(valid) - 1,
        "command": f"lmtrain eval --ckpt {shlex.quote(ckpt)} --split test {flags}",
        "seconds": time.perf_counter() - t0,
    }


def prepare(config, overrides, log):
    """`lmtrain prepare`: the corpus prepared into the cache; returns its description."""
    from lmtrain.data.sources import load_corpus

    cfg = load_config(config, overrides)
    if cfg.data.source == "synthetic":
        return "data.source synthetic is generated in memory by every run: nothing to prepare"
    if not cfg.data.cache:
        raise LmtrainError(
            f"data.cache is false in {config}: runs tokenise into memory and keep nothing; "
            f"set data.cache: true to prepare the corpus once"
        )
    return load_corpus(cfg.data, log=log).describe()


def bench(config, overrides, steps, repeats, vocab_size, layers, err_echo):
    """`lmtrain bench`: (the report, or None on ranks other than 0; the world)."""
    from lmtrain.bench import run_bench

    world = start_world(err_echo)
    cfg = world.on_every_rank(lambda: load_config(config, overrides))
    set_threads(world, cfg)
    report = run_bench(cfg, steps=steps, repeats=repeats, vocab_size=vocab_size, world=world, layers=layers)
    return (report if world.is_main else None), world


def labels(models):
    """A label for each (config, path): the cell and run name, with the seed where runs share a name."""
    from collections import Counter

    base = [f"{cfg.model.cell} ({cfg.output.name or os.path.basename(path)}" for cfg, path in models]
    names = [f"{b}, seed {cfg.seed})" if base.count(b) > 1 else f"{b})" for b, (cfg, _) in zip(base, models)]
    twice = Counter(names)
    return [f"{label} [{path}]" if twice[label] > 1 else label for label, (_, path) in zip(names, models)]


def seed_summary(results, configs, value):
    """{group label: {"members": [...], "min": [...], "median": [...], "max": [...]}} over the models that
    differ only in their seed (groups of two or more); ``value(rows)`` gives the numbers of one model."""
    from lmtrain.probes import seed_groups

    out = {}
    for name, members in seed_groups(configs).items():
        if len(members) > 1:
            values = np.array([value(results[m]) for m in members])
            out[name] = {
                "members": members,
                "min": values.min(axis=0).tolist(),
                "median": np.median(values, axis=0).tolist(),
                "max": values.max(axis=0).tolist(),
            }
    return out


def probe_recall(ckpts, distances, stories, mode):
    """`lmtrain probe recall`: {label: rows}, {label: ckpt path}, the seed groups' summary, chance, and
    {label: the names it gets wrong (probes.name_errors)}."""
    from lmtrain.probes import name_errors, recall

    models = [model_from_checkpoint(load_checkpoint(path), kernels="auto") for path in ckpts]
    results, configs, paths, errors = {}, {}, {}, {}
    for label, (model, vocab, cfg), path in zip(labels([(m[2], p) for m, p in zip(models, ckpts)]), models, ckpts):
        answers = []
        results[label] = recall(model, vocab, cfg, distances, stories, mode, answers)
        configs[label], paths[label], errors[label] = cfg, path, name_errors(answers)
    seeds = seed_summary(results, configs, lambda rows: [r["accuracy"] for r in rows])
    return results, paths, seeds, next(iter(results.values()))[0]["chance"], errors


def probe_gradflow(ckpts, configs, init_only, overrides, seeds, steps, batches, split):
    """`lmtrain probe gradflow`: ({label: {state: norms}}, {label: {state: decay rate}}, seed summary).
    The models use the reference layers in float64: the probe reads the gradient at every step's state."""
    from lmtrain.data.sources import load_corpus
    from lmtrain.probes import decay_rate, gradflow

    if init_only and (ckpts or not configs):
        raise LmtrainError("--init-only probes fresh models: give --config CONFIG (and no --ckpt)")
    if not init_only and (configs or not ckpts):
        raise LmtrainError("give --ckpt PATH, or --init-only with --config CONFIG")
    if seeds and not init_only:
        raise LmtrainError("--seeds sets the seeds of fresh models (--init-only); a checkpoint has its own")
    models = []
    for path in ckpts:
        model, vocab, cfg = model_from_checkpoint(load_checkpoint(path), dtype="float64", kernels="numpy")
        models.append((path, model, cfg, corpus_of_checkpoint(path, cfg, vocab, NO_OUTPUT)))
    for path in configs:
        for seed in seeds or [None]:
            cfg = load_config(path, [*overrides, *([f"seed={seed}"] if seed is not None else [])])
            corpus = load_corpus(cfg.data, log=NO_OUTPUT)
            models.append(
                (
                    path,
                    build_model(cfg.model, len(corpus.vocab), seed=cfg.seed, dtype="float64", kernels="numpy"),
                    cfg,
                    corpus,
                )
            )
    results, rates, cfgs = {}, {}, {}
    for label, (path, model, cfg, corpus) in zip(labels([(m[2], m[0]) for m in models]), models):
        results[label] = gradflow(model, corpus.split(split), steps=steps, batches=batches)
        rates[label], cfgs[label] = {state: decay_rate(v) for state, v in results[label].items()}, cfg
    return results, rates, seed_summary(rates, cfgs, lambda r: list(r.values()))


def read_lines(source):
    """The lines of a file, or of standard input for "-": UTF-8, without their line ends."""
    import sys

    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        from lmtrain.errors import require_file

        with open(require_file(source, "file to score", DataError), "rb") as fh:
            data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{'standard input' if source == '-' else source} is not UTF-8 text (bad byte on line {line})"
        ) from None
    return text.splitlines()


def score(ckpt, source, mode, batch_size):
    """`lmtrain score`: (the scored lines of lmtrain/scoring.py, the checkpoint's vocabulary)."""
    from lmtrain.scoring import score as run_score

    model, vocab, cfg = model_from_checkpoint(load_checkpoint(ckpt))
    lines = read_lines(source)
    return run_score(model, vocab, lines, mode, batch_size, cfg.train.bptt), vocab


def latest_checkpoint(say, root="runs"):
    """The best checkpoint of the most recent run under ``root`` (``say`` names it)."""
    found = glob.glob(os.path.join(root, "*", "checkpoints", "best.npz"))
    if not found:
        raise LmtrainError(
            f"no --ckpt given and no checkpoint under {root}/; train one with 'lmtrain fit CONFIG' or pass --ckpt PATH"
        )
    path = max(found, key=os.path.getmtime)
    say(f"using {path}")
    return path


def generate(ckpt, prompt, say, **options):
    """`lmtrain generate`: generate's result dict for the prompt (lmtrain/generate.py) and its "text"; without
    ``ckpt``, the latest run's best checkpoint (``say`` names it)."""
    from lmtrain.generate import generate as run_generate
    from lmtrain.generate import render

    if not prompt.strip():
        raise LmtrainError('the prompt is empty; give at least one word, e.g. --prompt "the market"')
    if ckpt is None:
        ckpt = latest_checkpoint(say)
    model, vocab, _ = model_from_checkpoint(load_checkpoint(ckpt), kernels="auto")
    out = run_generate(model, vocab, prompt, **options)
    return dict(out, text=render(out["prompt_tokens"] + out["continuation"]))
