"""Configuration: defaults in one place, overridden by a YAML file, then by --set.

A config has five sections (``data``, ``model``, ``train``, ``output`` and the
integer ``seed``).  Every key has a type and, where it matters, a range or a set
of allowed values; ``validate`` checks all of them and the rules that tie keys
together, so a typo fails before any work starts.
"""

import copy
import dataclasses
import difflib
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field

import yaml

from lmtrain.data.sources import SOURCE_DEFAULTS
from lmtrain.errors import ConfigError, require_file
from lmtrain.preset import path_of as preset_path


def option(default, help, *, choices=None, min=None, max=None, min_exclusive=False):
    """A config key: its default, a one-line description and its allowed values."""
    meta = dict(help=help, choices=choices, min=min, max=max, min_exclusive=min_exclusive)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SyntheticConfig:
    seed: int = option(1234, "seed of the story generator (independent of the training seed)", min=0)
    num_names: int = option(16, "size of the pool of names (half male, half female)", min=2, max=16)
    train_stories: int = option(6000, "stories in the training split", min=1)
    valid_stories: int = option(400, "stories in the validation split", min=1)
    test_stories: int = option(400, "stories in the test split", min=1)
    min_distance: int = option(0, "fewest distractor tokens between the remembered name and the question", min=0)
    max_distance: int = option(20, "most distractor tokens between the remembered name and the question", min=0)
    train_distances: str = option(
        "uniform",
        "how the training split draws each story's distance from "
        "[min_distance, max_distance]: uniform, or log-uniform (as many stories at "
        "1-2 as at 20-40: the short ones teach a model to keep the name, the long "
        "ones to keep it long); validation and test always draw uniformly",
        choices=["uniform", "log-uniform"],
    )


@dataclass
class DataConfig:
    source: str = option(
        "synthetic",
        "where the corpus comes from: the Penn Treebank, WikiText-2 or WikiText-103 "
        "(downloaded once), your own text files, or the built-in stories",
        choices=["ptb", "wikitext-2", "wikitext-103", "text", "synthetic"],
    )
    root: typing.Optional[str] = option(
        None, "ptb, wikitext-*: directory holding the corpus files, downloaded there when missing (null: data/<source>)"
    )
    download: bool = option(True, "ptb, wikitext-*: download the corpus when it is not under data.root")
    url: typing.Optional[str] = option(
        None,
        "ptb: base address of ptb.{train,valid,test}.txt; wikitext-*: "
        "address of the zip archive (null: the source's usual address)",
    )
    train: typing.Union[str, typing.List[str], None] = option(
        None, "text: training text: a file, a directory (its files in name order), or a list of either"
    )
    valid: typing.Union[str, typing.List[str], None] = option(None, "text: validation text, as data.train")
    test: typing.Union[str, typing.List[str], None] = option(None, "text: test text, as data.train")
    split: typing.List[float] = option(
        [0.9, 0.05, 0.05],
        "text, with data.train alone: the fractions of its lines "
        "that become train, valid and test, in that order (the first lines train, "
        "the last ones test)",
        min=0.0,
        min_exclusive=True,
    )
    tokenizer: str = option(
        "whitespace",
        "how text becomes tokens: whitespace (tokens are what spaces separate, "
        "the format of PTB and WikiText) or words (punctuation split from words, in any script; "
        "for raw text: docs/your-own-text.md); prompts and scored text are read the same way",
        choices=["whitespace", "words"],
    )
    normalize: typing.Optional[str] = option(
        None,
        "Unicode normalisation before tokenizing: null, NFC or NFKC "
        "(NFKC also folds compatibility forms: full-width letters, ligatures)",
        choices=["NFC", "NFKC"],
    )
    lowercase: bool = option(False, "lowercase every token (prompts are lowercased the same way)")
    min_freq: int = option(1, "words seen fewer times in training become <unk>", min=1)
    max_size: typing.Optional[int] = option(None, "keep only the most frequent words (specials included)", min=3)
    cache: bool = option(
        True,
        "keep the token ids prepared under data/cache/ (keyed by the files' content) and "
        "memory-map them; false: tokenise into memory on every run",
    )
    synthetic: SyntheticConfig = option(SyntheticConfig(), "synthetic: the built-in story corpus")


@dataclass
class ModelConfig:
    cell: str = option(
        "lstm", "recurrent cell: lstm, gru, or rnn (the plain tanh Elman RNN)", choices=["lstm", "gru", "rnn"]
    )
    emb_size: int = option(100, "word embedding size", min=1)
    hidden_size: int = option(100, "units per recurrent layer", min=1)
    num_layers: int = option(1, "stacked recurrent layers", min=1)
    last_hidden_size: typing.Optional[int] = option(
        None,
        "units of the last layer, if not hidden_size (AWD-LSTM: the embedding size, so the decoder can be tied)",
        min=1,
    )
    dropout: float = option(
        0.0, "dropout rate on the embedding output, between layers and before the decoder", min=0.0, max=1.0
    )
    dropout_input: typing.Optional[float] = option(
        None, "rate on the embedding output (null: model.dropout)", min=0.0, max=1.0
    )
    dropout_hidden: typing.Optional[float] = option(
        None, "rate between recurrent layers (null: model.dropout)", min=0.0, max=1.0
    )
    dropout_output: typing.Optional[float] = option(
        None, "rate before the decoder (null: model.dropout)", min=0.0, max=1.0
    )
    dropout_mode: str = option(
        "element",
        "element: a new mask for every value; locked: one mask per sequence "
        "and window, shared across time steps (variational dropout)",
        choices=["element", "locked"],
    )
    embedding_dropout: float = option(
        0.0, "drop whole word types from the embedding, per forward pass", min=0.0, max=1.0
    )
    weight_drop: float = option(
        0.0, "DropConnect rate on the recurrent weights W_h, one mask per forward pass", min=0.0, max=1.0
    )
    tie_weights: bool = option(
        False, "share the embedding matrix with the decoder (needs emb_size equal to the last layer's size)"
    )
    init: str = option(
        "uniform",
        "weight initialisation: uniform (every weight U(-init_scale, init_scale)); "
        "scaled_normal (N(0, 1/fan_in), embedding N(0, 0.01^2)); pytorch (PyTorch's defaults: "
        "embedding N(0, 1), the rest U(-1/sqrt(H), 1/sqrt(H)) biases included); awd (AWD-LSTM: "
        "embedding U(-init_scale, init_scale), recurrent layers as pytorch, decoder bias 0)",
        choices=["uniform", "scaled_normal", "pytorch", "awd"],
    )
    init_scale: float = option(0.1, "bound of the uniform initialisation", min=0.0, min_exclusive=True)
    forget_bias: float = option(0.0, "initial bias of the LSTM forget gate; 1 or more makes early memory longer-lived")
    orthogonal_recurrent: bool = option(False, "initialise each gate block of W_h as an orthogonal matrix")
    softmax: str = option(
        "full",
        "full: one softmax over the whole vocabulary; adaptive: Grave et al.'s adaptive "
        "softmax (a head over the most frequent words and one entry per tail cluster; each "
        "cluster behind a smaller projection): exact probabilities at a fraction of the cost "
        "for vocabularies of tens of thousands of words and more",
        choices=["full", "adaptive"],
    )
    adaptive_cutoffs: typing.Optional[typing.List[int]] = option(
        None,
        "adaptive: where the tail clusters start, e.g. [2000, 10000]: the head holds word ids 0-1999 "
        "(<eos>, <unk> and the most frequent words), the first tail cluster ids 2000-9999, the second the rest; "
        "strictly increasing, each below the vocabulary size",
        min=1,
    )
    adaptive_div: float = option(
        4.0,
        "adaptive: tail cluster i (from 0) projects the hidden state down to hidden / div^(i+1) units (at least 1)",
        min=1.0,
    )
    adaptive_tie_tails: bool = option(
        False,
        "adaptive, with tie_weights: the tail clusters' words are scored "
        "by their own embedding rows too, at full width and without a "
        "projection, so the adaptive softmax has exactly the tied full "
        "softmax's parameters (needs adaptive_div 1)",
    )


@dataclass
class TrainConfig:
    batch_size: int = option(20, "parallel streams the training split is laid out in", min=1)
    bptt: int = option(35, "time steps per truncated-BPTT window", min=1)
    epochs: int = option(4, "passes over the training split", min=1)
    max_steps: typing.Optional[int] = option(None, "stop after this many optimizer steps (for smoke tests)", min=1)
    optimizer: str = option(
        "sgd",
        "update rule; ntasgd: SGD that switches to averaged SGD when validation stops "
        "improving (AWD-LSTM); adamw: Adam with decoupled weight decay",
        choices=["sgd", "adam", "adamw", "ntasgd"],
    )
    lr: float = option(20.0, "learning rate", min=0.0, min_exclusive=True)
    momentum: float = option(0.0, "sgd: momentum", min=0.0, max=1.0)
    beta1: float = option(0.9, "adam: decay of the first moment", min=0.0, max=1.0)
    beta2: float = option(0.999, "adam: decay of the second moment", min=0.0, max=1.0)
    eps: float = option(1e-8, "adam: denominator guard", min=0.0, min_exclusive=True)
    weight_decay: float = option(0.0, "L2 penalty added to the gradient (adamw: decoupled decay)", min=0.0)
    average_from: typing.Optional[int] = option(
        None,
        "sgd, ntasgd: from the end of this epoch on, also keep the "
        "running mean of the weights after every step; evaluation and "
        "checkpoints use it (averaged SGD; null: never)",
        min=1,
    )
    nonmono: int = option(
        5,
        "ntasgd: switch to averaging when validation loss is worse than the best of all but the last nonmono checks",
        min=1,
    )
    clip_grad_norm: typing.Optional[float] = option(
        0.25, "clip the global gradient L2 norm to this (null: off)", min=0.0, min_exclusive=True
    )
    lr_schedule: str = option(
        "constant",
        "constant; step: multiply by lr_decay every epoch after lr_decay_start; "
        "plateau: multiply by lr_decay when validation perplexity stops improving; cosine: "
        "from lr down to min_lr along a half cosine over the run (its steps, or its "
        "time_budget); linear: the same along a straight line",
        choices=["constant", "step", "plateau", "cosine", "linear"],
    )
    warmup_steps: int = option(0, "raise the learning rate linearly from 0 over this many steps", min=0)
    min_lr: float = option(0.0, "cosine, linear: the final learning rate", min=0.0)
    lr_decay: float = option(
        0.5, "factor applied by the step and plateau schedules", min=0.0, max=1.0, min_exclusive=True
    )
    lr_decay_start: int = option(4, "step: the first decay happens after this epoch", min=0)
    plateau_patience: int = option(0, "plateau: epochs without improvement tolerated before decaying", min=0)
    variable_bptt: bool = option(
        False,
        "draw each window's length around bptt (AWD-LSTM: N(bptt, 5), bptt/2 "
        "with probability 0.05) and scale the learning rate by length / bptt",
    )
    ar: float = option(0.0, "activation regularisation: ar * mean(h^2) of the last layer's dropped output", min=0.0)
    tar: float = option(
        0.0, "temporal activation regularisation: tar * mean((h_t - h_{t-1})^2) of the last layer's output", min=0.0
    )
    time_budget: typing.Optional[float] = option(
        None,
        "minutes: stop training early enough that the final "
        "validation, test and checkpoints finish within this time; how many "
        "steps that is, and so the result, depends on the machine's "
        "speed and load (epochs and max_steps do not)",
        min=0.0,
        min_exclusive=True,
    )
    state_reset_prob: float = option(
        0.0,
        "chance that a stream's carried state is zeroed at a window start; "
        "above 0 the model also learns to start from an empty state, as "
        "generation does",
        min=0.0,
        max=1.0,
    )
    eval_batch_size: int = option(10, "streams used for validation and test evaluation", min=1)
    log_every: int = option(100, "optimizer steps between training-loss log lines", min=1)
    checkpoint_every: typing.Optional[int] = option(
        500, "steps between periodic checkpoints (last.npz); null: only at epoch ends", min=1
    )
    checkpoint_minutes: typing.Optional[float] = option(
        None, "also checkpoint when this many minutes passed since the last one", min=0.0, min_exclusive=True
    )
    keep_last: int = option(0, "also keep this many numbered periodic checkpoints (step-NNNNNNNN.npz)", min=0)
    max_bad_steps: int = option(
        5, "non-finite steps in a row (each skipped) before the run reloads its last checkpoint", min=1
    )
    bad_step_lr_factor: typing.Optional[float] = option(
        0.5,
        "learning-rate factor applied when reloading after divergence; null: stop with an error instead",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    )
    dtype: str = option("float32", "floating-point type of parameters and activations", choices=["float32", "float64"])
    kernels: str = option(
        "auto",
        "element-wise work and small batches' step products: numba's kernels (the "
        "fast extra: pip install 'lmtrain[fast]'), plain numpy, or auto (numba where "
        "installed); the environment variable LMTRAIN_KERNELS overrides it; results agree "
        "to float rounding",
        choices=["auto", "numba", "numpy"],
    )
    accumulate: int = option(
        1,
        "split each rank's streams into this many passes whose gradients are summed "
        "before the update (same update, less memory); batch_size must divide by "
        "ranks x accumulate",
        min=1,
    )
    threads_per_rank: typing.Optional[int] = option(
        None,
        "BLAS and element-wise threads of each process "
        "(null: the cores it may use divided by the ranks on its "
        "node; one process keeps the libraries' defaults)",
        min=1,
    )
    check_sync_every: typing.Optional[int] = option(
        None, "under MPI, check every this many steps that all ranks hold identical parameters (a debug check)", min=1
    )


@dataclass
class OutputConfig:
    dir: str = option("runs", "parent directory of run directories")
    name: typing.Optional[str] = option(None, "run name (default: the config file's name)")


@dataclass
class Config:
    data: DataConfig = option(DataConfig(), "corpus and vocabulary")
    model: ModelConfig = option(ModelConfig(), "network shape")
    train: TrainConfig = option(TrainConfig(), "optimisation")
    output: OutputConfig = option(OutputConfig(), "where results go")
    seed: int = option(0, "seed of initialisation, dropout and sampling", min=0)

    def to_dict(self):
        return dataclasses.asdict(self)


# Keys that may differ when a run is resumed, and what changing each does: how long the run goes on, what
# it logs or keeps, where things are, never the model, the data or the rule of the updates.  The table of
# docs/reliability.md is generated from it (``safe_keys_table``).
SAFE_ON_RESUME = {
    "train.epochs": "runs longer or shorter; under the cosine and linear schedules it also stretches or "
    "shrinks the rest of the decay, since they follow the fraction of the run done",
    "train.max_steps": "the same as train.epochs, counted in steps",
    "train.time_budget": "the same, counted in minutes of the whole run, earlier sessions included",
    "train.log_every": "how often a train line is logged",
    "train.checkpoint_every": "how often last.npz is written",
    "train.checkpoint_minutes": "how often last.npz is written, by the clock",
    "train.keep_last": "how many numbered checkpoints are kept",
    "train.max_bad_steps": "how many non-finite steps in a row are skipped before reloading",
    "train.bad_step_lr_factor": "what reloading after divergence does to the learning rate",
    "train.threads_per_rank": "how many threads each process uses (the last bits of sums may differ)",
    "train.check_sync_every": "how often the ranks check they hold the same parameters",
    "data.root": "where the corpus files are looked for (they must give the same vocabulary)",
    "data.download": "whether missing corpus files may be downloaded",
    "data.url": "where they are downloaded from (they are checked against the same pinned checksums)",
    "data.cache": "whether the token ids are kept in data/cache/",
    "output.dir": "the run directory's parent (for the default --run-dir)",
    "output.name": "the run directory's name (for the default --run-dir)",
}
SAFE_TO_CHANGE_ON_RESUME = set(SAFE_ON_RESUME)


def safe_keys_table():
    """Markdown table of SAFE_ON_RESUME (docs/reliability.md)."""
    rows = [f"| `{key}` | {what} |" for key, what in SAFE_ON_RESUME.items()]
    return "\n".join(["| key | changing it on resume |", "|---|---|", *rows])


def flatten(d, prefix=""):
    """{'train': {'lr': 1}} -> {'train.lr': 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------------------
# building a Config from plain data


def _keys(cls, prefix=""):
    """Every dotted key path a section accepts, nested sections included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        out.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_keys(hints[f.name], path + "."))
    return out


ALL_KEYS = _keys(Config)


# The names other tools give these keys (PyTorch's word_language_model, AWD-LSTM, Keras, ...): an unknown
# key whose last part is one of them is suggested the key it means.
OTHER_NAMES = {
    "learning_rate": "train.lr",
    "learningrate": "train.lr",
    "step_size": "train.lr",
    "nhid": "model.hidden_size",
    "hidden": "model.hidden_size",
    "hidden_dim": "model.hidden_size",
    "units": "model.hidden_size",
    "emsize": "model.emb_size",
    "embedding_size": "model.emb_size",
    "embedding_dim": "model.emb_size",
    "emb_dim": "model.emb_size",
    "nlayers": "model.num_layers",
    "layers": "model.num_layers",
    "n_layers": "model.num_layers",
    "rnn_type": "model.cell",
    "model": "model.cell",
    "tied": "model.tie_weights",
    "tie": "model.tie_weights",
    "dropout_rate": "model.dropout",
    "dropouti": "model.dropout_input",
    "dropouth": "model.dropout_hidden",
    "dropoute": "model.embedding_dropout",
    "wdrop": "model.weight_drop",
    "clip": "train.clip_grad_norm",
    "grad_clip": "train.clip_grad_norm",
    "clip_norm": "train.clip_grad_norm",
    "max_grad_norm": "train.clip_grad_norm",
    "batch": "train.batch_size",
    "batchsize": "train.batch_size",
    "seq_len": "train.bptt",
    "seq_length": "train.bptt",
    "sequence_length": "train.bptt",
    "num_steps": "train.bptt",
    "epoch": "train.epochs",
    "num_epochs": "train.epochs",
    "max_epochs": "train.epochs",
    "wdecay": "train.weight_decay",
    "optim": "train.optimizer",
    "log_interval": "train.log_every",
    "save": "output.dir",
    "data": "data.root",
}


def _unknown_key(path, source):
    last = path.rsplit(".", 1)[-1]
    close = [OTHER_NAMES[last.lower()]] if last.lower() in OTHER_NAMES else []
    close = close or difflib.get_close_matches(path, ALL_KEYS, n=1, cutoff=0.6)
    if not close:  # a misspelled last part alone, e.g. 'lr_decy' -> 'train.lr_decay'
        by_last = {k.rsplit(".", 1)[-1]: k for k in ALL_KEYS}
        close = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"'{path}'{hint}"


def _unknown_keys(paths, source):
    """One error naming every unknown key, each with a suggestion where one is close."""
    named = [_unknown_key(path, "") for path in paths]
    if len(named) == 1:  # unknown key 'x'; did you mean 'y'?
        return ConfigError(f"{source}unknown key {named[0].replace(' (did you mean', '; did you mean').rstrip(')')}")
    return ConfigError(f"{source}unknown keys {', '.join(named)}")


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def shown(value):
    """A value as an error message shows it: repr, cut short (a config value may be megabytes)."""
    return _SHORT.repr(value)


def _type_name(tp):
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_paths(path, value, source):
    """A path, or a non-empty list of paths (the text source's data.train and friends)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(f"{source}'{path}' must be a path or a list of paths, got {shown(value)}")


def _check_value(path, value, tp, meta, source):
    if typing.List[str] in typing.get_args(tp):
        return None if value is None else _check_paths(path, value, source)
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if typing.get_origin(tp) is list:  # model.adaptive_cutoffs: each item is checked as a key of its own
        if not isinstance(value, list):
            null = " or null" if optional else ""
            raise ConfigError(
                f"{source}'{path}' must be a list of integers{null}, e.g. [2000, 10000], got {shown(value)}"
            )
        return [_check_value(f"{path}[{k}]", v, typing.get_args(tp)[0], meta, source) for k, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        null = " or null" if optional else ""
        raise ConfigError(f"{source}'{path}' must be {_type_name(tp)}{null}, got {shown(value)}")
    if tp is float:
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{source}'{path}' must be a finite number, got {shown(value)}")
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        raise ConfigError(f"{source}'{path}' must be one of {allowed}; got {shown(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        word = "greater than" if meta.get("min_exclusive") else "at least"
        raise ConfigError(f"{source}'{path}' must be {word} {lo}, got {shown(value)}")
    if hi is not None and value > hi:
        raise ConfigError(f"{source}'{path}' must be at most {hi}, got {shown(value)}")
    return value


def _build(cls, raw, prefix, source):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        name = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{source}'{name}' must be a mapping of keys to values, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise _unknown_keys([prefix + (key if isinstance(key, str) else shown(key)) for key in unknown], source)
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            continue
        path = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], path + ".", source)
        else:
            kwargs[name] = _check_value(path, raw[name], hints[name], f.metadata, source)
    return cls(**kwargs)


def from_dict(raw, source=""):
    """Build and validate a Config from nested plain data (as YAML gives)."""
    cfg = _build(Config, raw, "", source)
    validate(cfg, source)
    return cfg


def validate(cfg, source=""):
    """Rules that involve more than one key."""
    d, m, t = cfg.data, cfg.model, cfg.train
    last = m.last_hidden_size or m.hidden_size
    if m.tie_weights and m.emb_size != last:
        which = "model.last_hidden_size" if m.last_hidden_size else "model.hidden_size"
        raise ConfigError(
            f"{source}model.tie_weights needs model.emb_size == {which} "
            f"(the decoder reads the last layer's {last} units), got {m.emb_size} and {last}"
        )
    if t.optimizer == "ntasgd" and t.momentum:
        raise ConfigError(f"{source}train.optimizer ntasgd averages plain SGD steps; set train.momentum to 0")
    if t.average_from is not None and (t.optimizer not in ("sgd", "ntasgd") or t.momentum):
        raise ConfigError(
            f"{source}train.average_from averages plain SGD steps; it needs train.optimizer sgd "
            f"or ntasgd and train.momentum 0"
        )
    if d.source == "text":
        if d.train is None:
            raise ConfigError(f"{source}data.source 'text' needs data.train (a file, a directory or a list)")
        if (d.valid is None) != (d.test is None):
            given, missing = ("valid", "test") if d.test is None else ("test", "valid")
            raise ConfigError(
                f"{source}data.{given} is set but data.{missing} is not: give both, or neither to "
                f"split data.train by lines (data.split)"
            )
    if len(d.split) != 3 or abs(sum(d.split) - 1.0) > 1e-9:
        raise ConfigError(
            f"{source}data.split must be three fractions (train, valid, test) that add up to 1, got {shown(d.split)}"
        )
    if m.softmax == "adaptive":
        c = m.adaptive_cutoffs
        if not c:
            raise ConfigError(
                f"{source}model.softmax adaptive needs model.adaptive_cutoffs, the first word of "
                "each tail cluster, e.g. [2000, 10000]"
            )
        if any(b <= a for a, b in zip(c, c[1:])):
            raise ConfigError(
                f"{source}model.adaptive_cutoffs must be strictly increasing (each tail cluster "
                f"needs at least one word), got {c}"
            )
        if m.adaptive_tie_tails and not (m.tie_weights and m.adaptive_div == 1):
            raise ConfigError(
                f"{source}model.adaptive_tie_tails scores the tail words with their embedding "
                "rows: it needs model.tie_weights true and model.adaptive_div 1"
            )
    s = d.synthetic
    if s.min_distance > s.max_distance:
        raise ConfigError(
            f"{source}data.synthetic.min_distance ({s.min_distance}) is larger than "
            f"data.synthetic.max_distance ({s.max_distance})"
        )
    default_root, default_url = SOURCE_DEFAULTS.get(d.source, (None, None))
    d.root = d.root if d.root is not None else default_root  # the resolved config names what is used
    d.url = d.url if d.url is not None else default_url


# ---------------------------------------------------------------------------
# files and overrides


def _yaml_error(path, err):
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return ConfigError(f"{where}: invalid YAML: {problem}")


MAX_NODES = 100_000  # values a config may hold once its aliases (*name) are expanded: an "alias bomb" of a
# few hundred bytes expands to billions, and an error message printing one would fill the disk


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently) and a
    document whose aliases expand to more than MAX_NODES values, and reads 1e-3 as the number people mean
    (YAML 1.1 wants 1.0e-3)."""

    def compose_node(self, parent, index):
        node = super().compose_node(parent, index)
        sizes = self.__dict__.setdefault("sizes", {})
        if id(node) not in sizes:  # an alias returns its anchor's node, already counted
            children = (
                node.value
                if isinstance(node, yaml.SequenceNode)
                else ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            )
            sizes[id(node)] = 1 + sum(sizes.get(id(child), 1) for child in children)
            if sizes[id(node)] > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases that expand to more than {MAX_NODES:,} values", node.start_mark
                )
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *defaults, whose keys this mapping may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shown(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# A float with an exponent and no dot (1e-3, 5E+2): YAML 1.1 reads it as a string.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(stream):
    """YAML text or a file object read by the strict loader."""
    return yaml.load(stream, Loader=_StrictLoader)


def read_yaml(path):
    """Read a YAML mapping, turning every failure into a one-line ConfigError."""
    path = require_file(path, "config file", ConfigError)
    try:
        return _read_mapping(path)
    except ConfigError as err:
        if path.endswith((".yaml", ".yml")):
            raise
        # most often a text file given where the config goes: say how to train on one
        raise ConfigError(
            f"{err} ({path} is not a config; to train on a text file: lmtrain fit own-text --set data.train={path})"
        ) from None


def _read_mapping(path):
    try:
        with open(path, encoding="utf-8") as fh:
            raw = load_yaml(fh)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if raw is None:
        raise ConfigError(
            f"{path}: the config file is empty; it needs at least one section (data, model, train, output or seed)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (data, model, train, output, seed), got {type(raw).__name__}"
        )
    return raw


def parse_override(text):
    """'train.lr=0.5' -> (['train', 'lr'], 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key.path=value, e.g. train.lr=0.5")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set '{text}': expected key.path=value, e.g. train.lr=0.5")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        if "expand to more than" in str(err):
            raise ConfigError(
                f"--set '{shown(text)}': YAML aliases that expand to more than {MAX_NODES:,} values"
            ) from None
        parsed = value  # a plain string such as a path with odd characters
    return key.split("."), parsed


def apply_overrides(raw, overrides):
    """Set dotted keys in nested plain data; unknown paths fail with a suggestion."""
    raw = dict(raw)
    for text in overrides:
        parts, value = parse_override(text)
        path = ".".join(parts)
        if path not in ALL_KEYS:
            raise _unknown_keys([path], "--set: ")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path, overrides=()):
    """The validated Config of a YAML file (or of the preset of that name: lmtrain/preset.py) with --set
    overrides applied."""
    path = preset_path(os.fspath(path))
    raw = read_yaml(path)
    raw = apply_overrides(raw, overrides)
    cfg = from_dict(raw, source=f"{path}: ")
    if cfg.output.name is None:
        cfg.output.name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return cfg


def dump_yaml(cfg):
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def reference_table():
    """Markdown table of every key: default, allowed values, meaning (docs/configuration.md)."""

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], prefix + f.name + ".")
                continue
            m = f.metadata
            allowed = (
                ", ".join(m["choices"])
                if m.get("choices")
                else " ".join(
                    ([(">" if m.get("min_exclusive") else "≥") + f" {m['min']}"] if m.get("min") is not None else [])
                    + ([f"≤ {m['max']}"] if m.get("max") is not None else [])
                )
            )
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
            yield f"| `{prefix}{f.name}` | `{default}` | {allowed} | {m['help']} |"

    return "\n".join(["| key | default | allowed | meaning |", "|---|---|---|---|", *walk(Config)])
