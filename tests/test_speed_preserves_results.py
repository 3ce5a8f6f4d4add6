"""The speed work must not change results: fixed-seed loss curves against those of the code before it."""

import json

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.reference_curves import CURVES, curve


@pytest.mark.parametrize("name", list(CURVES))
def test_loss_curve_matches_the_pre_optimization_code(name):
    reference = json.loads((ROOT / "tests" / "reference" / f"{name}.json").read_text())
    now = curve(name)
    assert [e[:2] for e in now] == [e[:2] for e in reference]
    np.testing.assert_allclose([e[2] for e in now], [e[2] for e in reference], rtol=1e-5)
