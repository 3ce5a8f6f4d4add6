"""The presets: config files that ship with lmtrain (lmtrain/presets/, also configs/ in the repository), run
by name (`lmtrain fit quickstart`) and listed by `lmtrain presets`.

Each preset starts with a few ``#: key: value`` lines (corpus, model, time, result) that `lmtrain presets`
and the README's table show; the comments after them say where the recipe comes from and what it gives.
"""

import os

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
FIELDS = ("corpus", "model", "time", "result")


def names():
    return sorted(n[:-5] for n in os.listdir(DIR) if n.endswith(".yaml"))


def path_of(config):
    """``config`` when it is a file; else the preset of that name ("quickstart", "quickstart.yaml"); else
    ``config`` unchanged (its loader then says it does not exist)."""
    if os.path.exists(config):
        return config
    name = os.path.basename(config)
    name = name[:-5] if name.endswith(".yaml") else name
    found = os.path.join(DIR, f"{name}.yaml")
    return found if os.path.dirname(config) in ("", "configs") and os.path.isfile(found) else config


def table():
    """The README's table of presets, from their ``#:`` lines (`make docs`)."""
    rows = ["| preset | corpus | model | time on 2 cores | expected result |", "|---|---|---|---|---|"]
    for name in names():
        a = about(name)
        rows.append(f"| `{name}` | {a['corpus']} | {a['model']} | {a['time']} | {a['result']} |")
    return "\n".join(rows)


def about(name):
    """{field: text} of a preset's ``#:`` lines."""
    out = {}
    with open(os.path.join(DIR, f"{name}.yaml"), encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("#: "):
                break
            key, _, value = line[3:].partition(":")
            out[key.strip()] = value.strip()
    return out
