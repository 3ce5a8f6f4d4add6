"""Every bad input of tests/bad_inputs.py gets one line naming the problem and its exit code, never a traceback."""

import os

import pytest

from tests.bad_inputs import CASES, prepare, run_main


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, _, _, _, fragment, code = case
    argv = prepare(case)
    exit_code, out, err = run_main(argv)
    assert exit_code == code, err
    assert "Traceback" not in out + err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert not os.path.exists("PWNED")  # nothing in a checkpoint ran


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_reliability_doc_lists_every_case():
    from tests.conftest import ROOT

    doc = (ROOT / "docs" / "reliability.md").read_text()
    for case in CASES:
        assert f"`test_bad_input[{case[0]}]`" in doc, case[0]
