import json
import subprocess
import sys

import pytest

from lmtrain.bench import flops
from lmtrain.config import ModelConfig
from lmtrain.nn.model import LanguageModel, products


def training_products(cfg, V, B, T, backward=True, tail_rows=None):
    """Every matrix product of a training window, as the model's layers report them (``lmtrain bench``'s
    list), of a model built at float32 on the numpy reference."""
    return products(LanguageModel(cfg, V), B, T, backward, tail_rows)


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
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmtrain",
            "bench",
            str(tiny_config),
            "--steps",
            "2",
            "--repeats",
            "1",
            "--vocab-size",
            "50",
            "--layers",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("eval_tokens_per_s", "generate_ms_per_token", "peak_rss_mb", "limit_best_rates_ms"):
        assert report[key] > 0, key
    # the figures agree with each other: a rate is the batch's tokens over the step's time, GFLOP/s that rate
    # times the products' FLOPs per token, the limit a fraction of the step
    c = report["config"]
    tokens = c["batch_size"] * c["bptt"]
    assert report["train_tokens_per_s"] == pytest.approx(tokens / (report["train_step_ms"] / 1000), rel=1e-9)
    assert report["train_gflop_s"] == pytest.approx(
        report["flops_per_token"] * report["train_tokens_per_s"] / 1e9, rel=1e-9
    )
    product_flops = sum(2 * m * k * n * p["count"] for p in report["products"] for m, k, n in [p["shape"]])
    assert product_flops == pytest.approx(report["flops_per_token"] * tokens)
    assert 0 < report["limit_step_ms"] < 10 * report["train_step_ms"] and 0 < report["percent_of_limit"] < 1000
    assert len(report["products"]) == 9
    assert report["eval_limit_tokens_per_s"] > 0
    assert list(report["layers"]["eval"]) == ["embedding", "lstm 0", "decoder", "softmax cross-entropy"]
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmtrain",
            "bench",
            str(tiny_config),
            "--steps",
            "2",
            "--repeats",
            "1",
            "--vocab-size",
            "50",
            "--layers",
        ],
        capture_output=True,
        text=True,
    ).stdout
    assert "where a window's time goes" in text and "the rest of a step" in text and "  lstm 0 " in text


def test_layer_times_account_for_the_window_and_leave_the_layers_as_they_were():
    """``--layers``: every layer of a 2-layer model with dropout in training and evaluation, the rest of
    the step, and parts that add up to no more than the window; afterwards no layer keeps a wrapper."""
    from lmtrain.bench import Bench
    from lmtrain.config import Config

    cfg = Config()
    cfg.model.emb_size = cfg.model.hidden_size = 24
    cfg.model.num_layers, cfg.model.dropout = 2, 0.3
    cfg.train.batch_size, cfg.train.bptt = 4, 6
    b = Bench(cfg, vocab_size=60, steps=3)
    t = b.layer_times(repeats=2)
    names = ["embedding", "dropout 0", "lstm 0", "dropout 1", "lstm 1", "dropout 2", "decoder", "softmax cross-entropy"]
    assert list(t["train"]) == names and list(t["eval"]) == names
    assert all(fwd > 0 and bwd > 0 for name, (fwd, bwd) in t["train"].items() if name != "softmax cross-entropy")
    assert all(t["eval"][name] > 0 for name in ("embedding", "lstm 0", "lstm 1", "decoder", "softmax cross-entropy"))
    assert 0 < t["train_rest"] and sum(map(sum, t["train"].values())) + t["train_rest"] <= t["train_window"]
    assert sum(t["eval"].values()) <= t["eval_window"]
    for _, layer in b.named_layers():
        assert "forward" not in vars(layer) and "backward" not in vars(layer)
    assert "train_step" not in vars(b)


def test_adaptive_products_count_each_cluster_on_its_rows():
    """Head on every row; a tail cluster's six products on its rows only, none when it gets none."""
    cfg = ModelConfig(emb_size=256, hidden_size=256, softmax="adaptive", adaptive_cutoffs=[20000, 60000])
    V, N = 267735, 20 * 35
    products = {name: (m, k, n) for name, m, k, n, _ in training_products(cfg, V, 20, 35, tail_rows=[24.6, 220])}
    assert products["head [h, 1] A (window)"] == (N, 257, 20002)
    assert products["tail 0 h P (its rows)"] == (25, 256, 64)
    assert products["tail 1 [u, 1] T (its rows)"] == (220, 17, 207735)
    assert products["tail 1 du P^T (its rows)"] == (220, 16, 256)
    assert not any("decoder" in name for name in products)
    assert len(training_products(cfg, V, 20, 35, tail_rows=[0.0, 220])) == len(products) - 6
    full = ModelConfig(emb_size=256, hidden_size=256)
    assert flops(training_products(full, V, 20, 35)) > 9 * flops(
        training_products(cfg, V, 20, 35, tail_rows=[24.6, 220])
    )


def test_bench_times_an_adaptive_model(tiny_config):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmtrain",
            "bench",
            str(tiny_config),
            "--steps",
            "2",
            "--repeats",
            "1",
            "--vocab-size",
            "300",
            "--set",
            "model.softmax=adaptive",
            "--set",
            "model.adaptive_cutoffs=[20,100]",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = report["config"]["tail_rows"]
    assert report["config"]["softmax"] == "adaptive" and len(rows) == 2 and sum(rows) > 0
    names = [p["product"] for p in report["products"]]
    assert names.count("head [h, 1] A (window)") == 1 and any(n.startswith("tail 1 ") for n in names)
    assert report["train_tokens_per_s"] > 0 and report["generate_ms_per_token"] > 0
