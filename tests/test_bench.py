import json
import subprocess
import sys

from lmtrain.bench import flops, training_products
from lmtrain.config import ModelConfig


def test_flop_counts_match_the_published_figures():
    """~6.5 M (config S) and ~80 M (config M) FLOPs per training token, as docs/performance.md states."""
    S = ModelConfig(emb_size=100, hidden_size=100, num_layers=1)
    M = ModelConfig(emb_size=650, hidden_size=650, num_layers=2, tie_weights=True)
    per_token = lambda cfg: flops(training_products(cfg, 10000, 20, 35)) / 700  # noqa: E731
    assert 6.4e6 < per_token(S) < 6.7e6
    assert 79e6 < per_token(M) < 81e6
    forward = lambda cfg: flops(training_products(cfg, 10000, 20, 35, backward=False)) / 700  # noqa: E731
    assert abs(3 * forward(M) - per_token(M)) < 0.01 * per_token(M)  # backward costs twice the forward


def test_bench_command_reports_every_figure(tiny_config):
    proc = subprocess.run([sys.executable, "-m", "lmtrain", "bench", str(tiny_config), "--steps", "2",
                           "--repeats", "1", "--vocab-size", "50", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("train_tokens_per_s", "eval_tokens_per_s", "generate_ms_per_token", "percent_of_limit",
                "train_gflop_s", "peak_rss_mb", "limit_step_ms"):
        assert report[key] > 0, key
    assert len(report["products"]) == 9
    assert report["eval_limit_tokens_per_s"] > 0
