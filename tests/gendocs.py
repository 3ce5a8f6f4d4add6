"""Regenerate the generated tables of docs/: `make docs`."""

from lmtrain.config import reference_table, safe_keys_table
from lmtrain.nn.layout import table as parameter_table
from lmtrain.preset import table as preset_table
from tests.bad_inputs import markdown

MARK = "<!-- the table below is generated: make docs -->\n"
END = "<!-- end of the generated table -->\n"
SAFE_MARK = "<!-- the table below is generated (the keys safe to change on resume): make docs -->\n"


def replace_table(path, table, mark=MARK):
    """Replace what follows MARK in ``path``, up to END where there is one, else to the end of the file."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index(mark) + len(mark)
    end = text.index(END, start) if END in text[start:] else len(text)
    rest = text[end:] if end < len(text) else ""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:start] + table + "\n" + rest)


if __name__ == "__main__":
    replace_table("README.md", preset_table())
    replace_table("docs/configuration.md", reference_table())
    replace_table("docs/checkpoint-format.md", parameter_table())
    replace_table("docs/reliability.md", markdown())
    replace_table("docs/reliability.md", safe_keys_table(), SAFE_MARK)
