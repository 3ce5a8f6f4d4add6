"""Every command the docs show is checked against the code, so the docs cannot drift from it.

Read: README.md, data/README.md and docs/*.md.  No training, no network, no subprocess.

What counts as a command
    A line of a fenced code block (backslash continuations joined, ``#`` comments dropped) or the text of an
    inline code span (`...`, in prose and tables), split into shell words by shlex; it is cut at ``|``, ``;``,
    ``&&`` and ``||`` (a ``|`` between two words; inside a word it separates alternatives, see below), and
    redirections (``> out``) are dropped.  A piece is a command when, after an optional ``$ `` prompt,
    ``VAR=value`` assignments, a shell ``do``/``then`` and a launcher (mpiexec, srun, time, nice) with its
    options, it starts with ``lmtrain``, ``.venv/bin/lmtrain``, ``python -m lmtrain`` or
    ``python benchmarks/NAME.py``.  A trailing ``(remark)`` on a code line is prose, like a comment.
    An inline span that starts with ``--set`` cites overrides: their keys are checked.

Synopsis style (the README's table, prose)
    ``[`` at a word's start and an unmatched ``]`` at its end mark optional parts and are stripped
    (``model.adaptive_cutoffs=[2000]`` keeps its brackets).  ``a|b`` (``a\\|b`` in a table) lists
    alternatives: each is checked.  A placeholder is ``...`` (or a word containing it), an ALL-CAPS word
    (PATH, FILE, N, CONFIG, RUN_DIR, CONFIG.yaml), one non-ASCII letter (η, λ), ``<name>`` or a ``$variable``;
    a ``--set`` value is also a placeholder when it is one letter (``seed=S``, ``batch_size=b``), and
    ``key.path=value`` / ``KEY=VALUE`` are the synopsis of ``--set`` itself.  Placeholders are never
    converted or loaded; everything around them still is.  A code line with an optional part (``[--json]``,
    ``[PATH]``) is a synopsis as well: a lone ``|`` inside its brackets means "or", and a second column after
    two spaces (a usage listing's description) is dropped.

What is checked
    1. The subcommand (nested groups included: ``probe recall``) exists in ``lmtrain.cli.cli``.
    2. Each ``--flag`` / ``-x`` is an option of that command (or of the group before it); a literal value is
       converted by the option's click type, so a wrong click.Choice (``--format tflite``) or an
       out-of-range number fails; a code-block command that is not elided (``...``) also needs its required
       options and arguments, and no extra arguments.
    3. Each ``--set key=value`` names a key of lmtrain.config (``apply_overrides`` refuses unknown keys).
    4. A config argument (``fit``/``prepare``/``bench`` CONFIG, ``probe gradflow --config``) is a file of the
       repository, a preset ``lmtrain.preset`` resolves, or one of PLACEHOLDER_CONFIGS; a real one is loaded
       with its non-placeholder overrides by ``load_config``, which must accept them.
    5. Cited repository paths (benchmarks/*.py, configs/*.yaml, docs/*.md, tests/*.py, lmtrain/**) exist;
       local markdown links point at existing files, and a ``#anchor`` at a heading of the target (GitHub's
       slug rule).  Runtime paths (runs/..., data/..., *.npz) are not checked.
    6. ``python benchmarks/NAME.py``: the script exists and every flag is one its argparse parser defines
       (read from the source with ast: nothing is imported); speed_on_corpus.py's ``--variant
       NAME:KEY=VALUE,...`` holds --set overrides, whose keys are checked.

Bad inputs on purpose
    A table row that shows the ``error:`` its command prints (docs/reliability.md's table, generated from
    tests/bad_inputs.py and run by tests/test_bad_inputs.py) is a wrong command by design.  Its config
    (a scratch file of the test) and the number of its arguments (the table joins argv unquoted and cuts
    long ones) are not checked; any other problem is accepted only when the row's message names its culprit
    (the flag, key or subcommand), so a renamed flag there still fails.

Each document is a test case whose failure lists every problem as ``file:line: `command`: what is wrong``;
``test_what_is_checked`` prints how many commands, flags, keys, configs, paths and links were checked (-s, -rP).
"""

import ast
import collections
import dataclasses
import functools
import re
import shlex

import click
import pytest

from lmtrain import config, preset
from lmtrain.cli import cli
from lmtrain.errors import ConfigError
from tests.conftest import ROOT

DOCS = ["README.md", "data/README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]

PLACEHOLDER_CONFIGS = {"my.yaml"}  # config files of the reader's own that the docs name (README: lmtrain fit my.yaml)
SET_SYNOPSES = {"key.path=value", "KEY=VALUE"}  # how the docs write --set's own argument
LAUNCHERS = {"mpiexec", "mpirun", "srun", "time", "/usr/bin/time", "nice", "env"}
SHELL_PREFIXES = {"$", "do", "then", "else"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>"}
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*(?:\.[a-z]+)?|[^\x00-\x7f]|<[^>]*>)$")
CITED_PATH = re.compile(
    r"(?<![\w./-])((?:benchmarks|configs|docs|tests)/[\w.-]*\w\.(?:py|yaml|md)|lmtrain/[\w./-]*\w\.(?:py|yaml))"
    r"(?![\w/])"
)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
SPAN = re.compile(r"(?<![`\\])(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
FENCE = re.compile(r"^\s*(```+|~~~+)")
SYNOPSIS = re.compile(r"\[-|\[[A-Z]")  # an optional part: [--json], [PATH]
DESCRIPTION = re.compile(r"\s{2,}(?=[a-z(])")  # a usage listing's second column: `lmtrain eval [--json]  perplexity`


def is_placeholder(word):
    return "..." in word or "$" in word or bool(PLACEHOLDER.match(word))


def is_set_placeholder(override):
    """``seed=S``, ``train.batch_size=b``, ``seed=$seed``: only the key can be checked."""
    value = override.partition("=")[2]
    return override in SET_SYNOPSES or len(value) == 1 or is_placeholder(value)


@dataclasses.dataclass
class Snippet:
    doc: str
    line: int
    text: str
    block: bool  # a line of a fenced code block (a whole command), not an inline span (maybe a fragment)
    row: str = None  # for a row of a bad-inputs table: the row, less the command, where its error is named


class Checker:
    """Checks the snippets of one document, keeping a tally of what was checked and a list of problems."""

    def __init__(self):
        self.tally = collections.Counter()
        self.problems = []

    def problem(self, snippet, message, culprit=None):
        if snippet.row is not None and culprit and culprit in snippet.row:
            self.tally["bad inputs on purpose"] += 1
            return
        self.problems.append(f"{snippet.doc}:{snippet.line}: `{snippet.text}`: {message}")

    # -- lmtrain commands ---------------------------------------------------------------------------------

    def lmtrain(self, snippet, args):
        self.tally["commands"] += 1
        # a code line is a whole command, whose arity is checked too, unless it is a synopsis or elided
        strict = snippet.block and snippet.row is None and not SYNOPSIS.search(snippet.text)
        strict = strict and not any("..." in a for a in args)
        ctx = click.Context(cli, info_name="lmtrain", **cli.context_settings)  # -h as well as --help
        command, path, i = cli, "lmtrain", 0
        while isinstance(command, click.Group) and i < len(args):
            word = args[i]
            if word.startswith("-"):  # a group option (--debug, --version, -h)
                i = self.options(snippet, command, ctx, path, args, i, strict)[0]
                continue
            if is_placeholder(word):
                return
            sub = command.get_command(ctx, word)
            if sub is None:
                return self.problem(snippet, f"'{path}' has no subcommand '{word}'", word)
            command, path, i = sub, f"{path} {word}", i + 1
            ctx = click.Context(command, info_name=word, parent=ctx)
        if isinstance(command, click.Group):
            if strict and command is not cli:
                self.problem(snippet, f"'{path}' needs a subcommand")
            return
        self.command_args(snippet, command, ctx, path, args[i:], strict)

    def command_args(self, snippet, command, ctx, path, args, strict):
        arguments = [p for p in command.get_params(ctx) if isinstance(p, click.Argument)]
        given, overrides, configs, positional, i = set(), [], [], [], 0
        while i < len(args):
            word = args[i]
            if word.startswith("-") and len(word) > 1 and not word[1].isdigit():
                i, option, values = self.options(snippet, command, ctx, path, args, i, strict)
                if option is None:  # its value, if it has one, would be reported as an extra argument
                    strict = False
                else:
                    given.add(option.name)
                    if "--set" in option.opts:
                        overrides += values
                    elif option.name in ("config", "configs"):
                        configs += values
                continue
            positional.append(word)
            i += 1
        for argument in arguments:  # click fills arguments in order; nargs=-1 takes the rest
            take = positional if argument.nargs == -1 else positional[: max(argument.nargs, 1)]
            positional = [] if argument.nargs == -1 else positional[len(take) :]
            if take:
                given.add(argument.name)
            if argument.name in ("config", "configs"):
                configs += take
        if snippet.row is not None:  # argv of the bad-inputs table is shown unquoted: its arity is not reliable
            return self.config_and_overrides(snippet, [], overrides)
        for word in positional if strict else []:
            self.problem(snippet, f"'{path}' takes no further argument '{word}'", word)
        for param in command.get_params(ctx) if strict else []:
            if param.required and param.name not in given:
                self.problem(snippet, f"'{path}' needs {param.get_error_hint(ctx)}")
        self.config_and_overrides(snippet, configs, overrides)

    def options(self, snippet, command, ctx, path, args, i, strict):
        """Check the option at ``args[i]`` and its value(s); return the next index, the option (None when
        unknown) and its literal values."""
        word = args[i]
        name, eq, inline = word.partition("=")
        self.tally["flags"] += 1
        option = next(
            (p for p in command.get_params(ctx) if isinstance(p, click.Option) and name in p.opts + p.secondary_opts),
            None,
        )
        if option is None:
            self.problem(snippet, f"'{path}' has no option {name}", name)
            return i + 1, None, []
        i += 1
        if option.is_flag or option.count:
            return i, option, []
        if eq:
            values = [inline]
        elif getattr(option, "_flag_needs_value", False):  # --resume [PATH]: the value is optional
            values = [args[i]] if i < len(args) and not args[i].startswith("-") else []
            i += len(values)
        elif i + option.nargs <= len(args):
            values, i = args[i : i + option.nargs], i + option.nargs
        else:
            if strict:
                self.problem(snippet, f"{name} of '{path}' needs a value", name)
            return i, option, []
        if "--set" in option.opts:
            return i, option, values
        for value in values:
            for alternative in value.split("|") if "|" in value else [value]:
                if is_placeholder(alternative):
                    continue
                try:
                    option.type.convert(alternative, option, ctx)
                except click.BadParameter as err:
                    self.problem(snippet, f"{name} {alternative!r}: {err.format_message()}", name)
        return i, option, values

    def config_and_overrides(self, snippet, configs, overrides):
        real = []  # the overrides a config can be loaded with: known keys, values that are no placeholder
        for override in overrides:
            self.tally["--set keys"] += 1
            if override in SET_SYNOPSES:
                continue
            try:  # refuses an unknown key whatever the value; the value is checked by load_config below
                config.apply_overrides({}, [override])
            except ConfigError as err:
                self.problem(snippet, f"--set {override}: {err}", override.partition("=")[0])
                continue
            if not is_set_placeholder(override):  # seed=S cannot load: its key alone is checked
                real.append(override)
        for name in [alternative for name in configs for alternative in name.split("|")]:  # CONFIG|PRESET
            self.tally["config arguments"] += 1
            if is_placeholder(name) or name in PLACEHOLDER_CONFIGS:
                continue
            path = ROOT / name if (ROOT / name).is_file() else preset.path_of(name)  # path_of: name when no preset
            if path == name:
                self.problem(snippet, f"config {name} is no file of the repository, no preset and no placeholder")
                continue
            try:
                config.load_config(path, real)
            except ConfigError as err:
                self.problem(snippet, f"config {name} with {' '.join(real) or 'no override'}: {err}")

    # -- benchmark scripts --------------------------------------------------------------------------------

    def benchmark(self, snippet, script, args):
        self.tally["commands"] += 1
        if not (ROOT / script).is_file():
            return self.problem(snippet, f"{script} does not exist", script)
        known = script_options(script)
        i = 0
        while i < len(args):
            word = args[i]
            i += 1
            if not word.startswith("-") or len(word) == 1 or word[1].isdigit():
                continue
            self.tally["flags"] += 1
            name, eq, inline = word.partition("=")
            if name not in known:
                self.problem(snippet, f"{script} has no option {name}", name)
                continue
            if not known[name] or eq:
                values = [inline] if eq else []
            else:
                values, i = args[i : i + 1], i + 1
            if name == "--variant" and script.endswith("speed_on_corpus.py"):  # NAME:KEY=VALUE[,KEY=VALUE...]
                for value in values:
                    self.config_and_overrides(snippet, [], value.partition(":")[2].split(","))

    # -- markdown ---------------------------------------------------------------------------------------------

    def document(self, doc, text):
        """Check every command, cited path and link of the markdown ``text`` (named ``doc``)."""
        prose, blocks = split_fences(text)
        for line, command in blocks:
            self.snippet(Snippet(doc, line, command, block=True))
        for line, span, row in inline_spans(prose):
            self.snippet(Snippet(doc, line, span, block=False, row=row))
        for match in CITED_PATH.finditer(text):
            if text[: match.start()].endswith("](") or text[match.end() :].startswith("]("):
                continue  # a link's target or text: the link is checked, relative to the doc
            self.tally["cited paths"] += 1
            if not (ROOT / match[1]).exists():
                line = text.count("\n", 0, match.start()) + 1
                self.problems.append(f"{doc}:{line}: cites {match[1]}, which does not exist")
        self.links(doc, prose)

    def snippet(self, snippet):
        if snippet.block and SYNOPSIS.search(snippet.text):
            snippet.text = DESCRIPTION.split(snippet.text, maxsplit=1)[0]
        for words in pieces(snippet.text, snippet.block):
            if words[0] == "--set":  # a span citing overrides: `--set model.softmax=full`
                sets = [words[k + 1] for k, w in enumerate(words[:-1]) if w == "--set"]
                self.config_and_overrides(snippet, [], sets)
                continue
            found = invocation(words)
            if found is not None:
                kind, script, args = found
                self.lmtrain(snippet, args) if kind == "lmtrain" else self.benchmark(snippet, script, args)

    def links(self, doc, prose):
        here = (ROOT / doc).parent
        for match in [*LINK.finditer(prose), *REFERENCE.finditer(prose)]:
            target = match[1]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            self.tally["links"] += 1
            line = prose.count("\n", 0, match.start()) + 1
            file, _, anchor = target.partition("#")
            path = (here / file).resolve() if file else ROOT / doc
            if not path.exists():
                self.problems.append(f"{doc}:{line}: link {target}: {file} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                self.problems.append(f"{doc}:{line}: link {target}: {path.name} has no heading #{anchor}")


def split_fences(text):
    """The text with every fenced block blanked (lines kept, so line numbers hold) and the command lines of
    those blocks as (line, text), backslash continuations joined."""
    prose, blocks, fence, pending = [], [], None, None
    for n, line in enumerate(text.split("\n"), 1):
        mark = FENCE.match(line)
        if fence is None and mark:
            fence = mark[1][0] * len(mark[1])
            prose.append("")
            continue
        if fence is not None:
            prose.append("")
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence, pending = None, None
                continue
            start, joined = pending or (n, "")
            joined += line.strip()
            if joined.endswith("\\"):
                pending = (start, joined[:-1].rstrip() + " ")
            else:
                pending = None
                blocks.append((start, joined.strip()))
            continue
        prose.append(line)
    return "\n".join(prose), blocks


def inline_spans(prose):
    """(line, text, row) of each inline code span; ``row`` is the rest of a bad-inputs table row (see the
    module's docstring), else None.  A span never crosses a paragraph: each is searched separately."""
    lines = prose.split("\n")
    for paragraph in re.finditer(r"(?:^[^\n]*\S[^\n]*(?:\n|$))+", prose, re.M):
        for match in SPAN.finditer(paragraph[0]):
            line = prose.count("\n", 0, paragraph.start() + match.start()) + 1
            row = lines[line - 1]
            bad_input = row.lstrip().startswith("|") and re.search(r"\|\s*error:", row)
            yield line, " ".join(match[2].split()), row.replace(match[0], "") if bad_input else None


def pieces(text, block):
    """The shell commands of ``text``: lists of words, split at pipes and separators, with redirections,
    synopsis brackets and (on a code line) a trailing ``(remark)`` removed."""
    text = text.replace("\\|", "|")
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = "#" if block else ""
    try:
        words = list(lex)
    except ValueError:  # an unbalanced quote in prose: plain words
        words = text.split()
    out, current, skip, remark, depth = [], [], False, False, 0
    for word in words:
        if word == "|" and depth > 0:  # `[--split S | --text FILE]`: "or", inside a synopsis's brackets
            continue
        inner = word.lstrip("[")
        depth += len(word) - len(inner) - (len(inner) - len(unbracket(inner)))
        if remark:
            remark = not word.endswith(")")
            continue
        if skip:
            skip = False
            continue
        if word in REDIRECTS:
            skip = True
            continue
        if word.startswith((">", "2>")):
            continue
        if block and word.startswith("(") and current:
            remark = not word.endswith(")")
            continue
        end = word in SEPARATORS or (word.endswith(";") and len(word) > 1)
        if word not in SEPARATORS:
            word = unbracket(word.rstrip(";") if end else word)
            if word:
                current.append(word)
        if end and current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def unbracket(word):
    """Strip the synopsis's optional brackets: '[--set' -> '--set', 'test]' -> 'test', '[PATH]' -> 'PATH',
    while a value's own brackets stay: 'model.adaptive_cutoffs=[2000]'."""
    word = word.lstrip("[")
    while word.endswith("]") and word.count("]") > word.count("["):
        word = word[:-1]
    return word


def is_lmtrain(word):
    return word == "lmtrain" or word.endswith("/bin/lmtrain")


def is_python(word):
    return word in ("python", "python3") or word.endswith(("/bin/python", "/bin/python3"))


def invocation(words):
    """('lmtrain', None, args), ('benchmark', 'benchmarks/NAME.py', args) or None."""
    i = 0
    while i < len(words) and (words[i] in SHELL_PREFIXES or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[i])):
        i += 1
    if i < len(words) and words[i] in LAUNCHERS:  # its own options come before the program
        i = next((k for k in range(i, len(words)) if is_lmtrain(words[k]) or is_python(words[k])), len(words))
    if i >= len(words):
        return None
    program, rest = words[i], words[i + 1 :]
    if is_lmtrain(program):
        return "lmtrain", None, rest
    if is_python(program):
        if rest[:2] == ["-m", "lmtrain"]:
            return "lmtrain", None, rest[2:]
        if rest and rest[0].startswith("benchmarks/") and rest[0].endswith(".py"):
            return "benchmark", rest[0], rest[1:]
    return None


@functools.lru_cache(maxsize=None)
def script_options(script):
    """{option: takes a value} of a benchmark script's argparse parser, read from its source."""
    options = {"-h": False, "--help": False}
    no_value = {"store_true", "store_false", "store_const", "append_const", "count", "help", "version"}
    for node in ast.walk(ast.parse((ROOT / script).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            action = next((k.value.value for k in node.keywords if k.arg == "action"), None)
            options.update({n: action not in no_value for n in names if n.startswith("-")})
    return options


def slug(heading):
    """GitHub's anchor of a heading: links become their text, lowercase, punctuation dropped, spaces to '-'."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path):
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen, out = collections.Counter(), set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", prose))
    for match in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose, re.M):
        base = slug(match[1])
        out.add(base if not seen[base] else f"{base}-{seen[base]}")  # a repeated heading gets -1, -2, ...
        seen[base] += 1
    return out


def check_markdown(doc, text):
    """The problems and the tally of what was checked in the markdown ``text`` of the file ``doc``."""
    checker = Checker()
    checker.document(doc, text)
    return list(dict.fromkeys(checker.problems)), checker.tally  # a path cited twice on a line: reported once


@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands_match_the_code(doc):
    problems, tally = check_markdown(doc, (ROOT / doc).read_text(encoding="utf-8"))
    print(f"{doc}: checked " + ", ".join(f"{n} {what}" for what, n in sorted(tally.items())))
    assert not problems, f"{len(problems)} problem(s) in {doc}:\n" + "\n".join(problems)


def test_what_is_checked():
    """The checker finds what the docs show (a parser that silently matched nothing would pass every doc)."""
    total = collections.Counter()
    for doc in DOCS:
        total += check_markdown(doc, (ROOT / doc).read_text(encoding="utf-8"))[1]
    print("checked in all docs: " + ", ".join(f"{n} {what}" for what, n in sorted(total.items())))
    # about half of what the docs hold: a parser that broke would find next to nothing
    floors = {"commands": 100, "flags": 120, "--set keys": 30, "config arguments": 25, "links": 15, "cited paths": 40}
    short = {what: total[what] for what, least in floors.items() if total[what] < least}
    assert not short, f"fewer checks than the docs hold: {short} (all: {dict(total)})"


SNIPPET = """\
# Scoring

```
lmtrain score --ckpt runs/x/checkpoints/best.npz --per-words sentences.txt
lmtrain fit configs/ptb-small.yaml --set train.lr_decy=0.5 \\
    --set seed=S
lmtrain export --ckpt runs/x/checkpoints/best.npz --out m.onnx
```

| `lmtrain export --ckpt PATH --format onnx\\|tflite --out FILE` | exports |
| `lmtrain frobnicate` | error: No such command 'frobnicate'. |
| `lmtrain eval --ckpt x.npz --splt train` | error: Invalid value for '--split': 'train' is not one of 'valid', 'test' |

Train with `lmtrain fit nosuch-preset`, probe with `lmtrain probe recall --ckpt PATH --mode steam`,
time it with `python benchmarks/scaling.py --rank 2` and see [the results](docs/performance.md#no-such-part).
"""


def test_checker_reports_wrong_commands():
    """The check can fail: each mistake in SNIPPET is reported with its line, and nothing else is."""
    problems, tally = check_markdown("SNIPPET.md", SNIPPET)
    expected = [
        ("SNIPPET.md:4:", "'lmtrain score' has no option --per-words"),
        ("SNIPPET.md:5:", "unknown key 'train.lr_decy'; did you mean 'train.lr_decay'?"),
        ("SNIPPET.md:7:", "'lmtrain export' needs '--format'"),
        ("SNIPPET.md:10:", "--format 'tflite'"),
        ("SNIPPET.md:12:", "'lmtrain eval' has no option --splt"),  # the row's message names --split, not --splt
        ("SNIPPET.md:14:", "config nosuch-preset is no file of the repository"),
        ("SNIPPET.md:14:", "--mode 'steam'"),
        ("SNIPPET.md:15:", "benchmarks/scaling.py has no option --rank"),
        ("SNIPPET.md:15:", "performance.md has no heading #no-such-part"),
    ]
    for where, what in expected:
        assert any(p.startswith(where) and what in p for p in problems), f"not reported: {where} {what}\n{problems}"
    assert len(problems) == len(expected), "\n".join(problems)
    assert tally["bad inputs on purpose"] == 1  # `lmtrain frobnicate`, whose row names the culprit


def test_checker_accepts_the_synopsis_style():
    """Brackets, alternatives, placeholders, launchers and prompts are read as the module's docstring says."""
    text = """\
| `lmtrain eval --ckpt PATH [--split valid\\|test] [--text FILE] [--batch-size N] [--json]` | x |
| `lmtrain fit CONFIG.yaml [--set key.path=value ...] [--run-dir DIR]` and `lmtrain fit CONFIG --resume [PATH]` | x |

```
$ LMTRAIN_KERNELS=numpy mpiexec -n 2 lmtrain fit configs/ptb-dlfs2.yaml --set seed=$seed (the same --set options)
srun -N 4 --ntasks-per-node=2 .venv/bin/lmtrain bench own-text --set 'model.adaptive_cutoffs=[20]' --steps 5
cut -f3 nbest.txt | python -m lmtrain score --base 10 --json - > lm.jsonl
python benchmarks/speed_on_corpus.py --variant 'batch 10:train.batch_size=10'
lmtrain fit my.yaml
```

```
lmtrain fit CONFIG|PRESET [--set key.path=value ...] [--run-dir DIR]    train (Ctrl-C saves; --resume RUN_DIR continues)
lmtrain eval [--ckpt PATH] [--split valid|test | --text FILE] [--json]  perplexity and bits per word
```
"""
    problems, tally = check_markdown("OK.md", text)
    assert not problems, "\n".join(problems)
    assert (tally["commands"], tally["flags"], tally["--set keys"], tally["config arguments"]) == (10, 20, 5, 7)
