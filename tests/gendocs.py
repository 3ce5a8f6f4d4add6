"""Regenerate the generated tables of docs/: `make docs`."""
from lmtrain.config import reference_table
from tests.bad_inputs import markdown

MARK = "<!-- the table below is generated: make docs -->\n"


def replace_table(path, table):
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:text.index(MARK) + len(MARK)] + table + "\n")


if __name__ == "__main__":
    replace_table("docs/configuration.md", reference_table())
    replace_table("docs/reliability.md", markdown())
