"""Quality claims, each from a run made for it.

The quickstart check runs by default (about four minutes, one seed); the
quickstart's other seeds, the recall preset (about 6 minutes a seed) and the
PTB presets (five minutes to 80 minutes each) are marked slow (`make test-slow`).
"""

import json

import numpy as np
import pytest

from lmtrain.build import model_from_checkpoint
from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import load_config
from lmtrain.data import synthetic
from lmtrain.generate import generate
from lmtrain.probes import recall
from lmtrain.training import fit
from tests.conftest import ROOT

EXAMPLE = "tom was watching tv in his room . mary came into the room . mary said hi to"


def quickstart_checks(tmp_path, seed):
    """The quickstart with ``seed``: (the greedy answer to the README's prompt, recall on held-out stories)."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"seed={seed}"])
    fit(cfg, str(tmp_path / "run"), quiet=True)
    model, vocab, cfg = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / "best.npz"))
    out = generate(model, vocab, EXAMPLE.replace("mary said", "Mary said"), max_tokens=1, greedy=True, show_top=3)

    # held-out stories: a stream the training split never used, minus any story it happens to contain
    train = set(synthetic.generate_lines(cfg.data.synthetic, "train"))
    rng = np.random.default_rng([cfg.data.synthetic.seed, 99])
    names = synthetic.name_pool(cfg.data.synthetic.num_names)
    hits = total = 0
    while total < 100:
        tokens, answer = synthetic.story(rng, int(rng.integers(0, 6)), names)
        if " ".join(tokens) in train:
            continue
        prompt = " ".join(tokens[:answer])
        hits += generate(model, vocab, prompt, max_tokens=1, greedy=True)["continuation"] == [tokens[answer]]
        total += 1
    return out["continuation"], hits / total


def test_quickstart_remembers_the_other_name(tmp_path):
    answer, recall = quickstart_checks(tmp_path, seed=1)  # the preset's seed
    assert answer == ["tom"] and recall >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_quickstart_remembers_the_other_name_with_other_seeds(tmp_path, seed):
    answer, recall = quickstart_checks(tmp_path, seed)
    assert answer == ["tom"] and recall >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("seed", [6, 7])  # 1.000 in docs/why-lstm.md; seed 9 of the ten failed there
def test_recall_lstm_keeps_the_name_across_40_distractor_tokens(tmp_path, seed):
    """configs/recall-lstm.yaml (7 epochs, 6,055 steps, about 6 minutes): at distance 40, the right name first on 95% of
    held-out stories, read as in training."""
    fit(load_config(ROOT / "configs" / "recall-lstm.yaml", [f"seed={seed}"]), str(tmp_path / "run"), quiet=True)
    model, vocab, cfg = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / "best.npz"))
    assert recall(model, vocab, cfg, [40], n=200)[0]["accuracy"] >= 0.95


def ptb_run(ptb, tmp_path, preset):
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml", [f"data.root={ptb}"])
    fit(cfg, str(tmp_path / preset), quiet=True)
    events = [json.loads(l) for l in (tmp_path / preset / "metrics.jsonl").read_text().splitlines()]
    return events[-1]["ppl"]


@pytest.mark.slow
def test_ptb_dlfs2_beats_the_book(ptb, tmp_path):
    """The book's code gives 136.2; the preset trains as it does and evaluates the fourth epoch's mean weights,
    which ended at 114.8-117.8 over seeds 0-9 on both paths (README): 120 is about three standard deviations out."""
    assert ptb_run(ptb, tmp_path, "ptb-dlfs2") <= 120.0


@pytest.mark.slow
def test_ptb_small_matches_zaremba(ptb, tmp_path):
    assert ptb_run(ptb, tmp_path, "ptb-small") <= 115.0


@pytest.mark.slow
def test_ptb_speedrun_reaches_its_published_result(ptb, tmp_path):
    # The docs publish seeds 0 and 1: test 80.89 and 80.65 after 26,560 steps.  Another thread count or
    # BLAS sums in another order and starts what is in effect another seed, hence the margin.
    assert ptb_run(ptb, tmp_path, "ptb-speedrun") <= 82.0
