"""What a run writes to metrics.jsonl (rank 0 only) and prints as it goes."""

import math
import time

from lmtrain.evaluation import perplexity


class RunLog:
    def __init__(self, metrics, world, progress, budget, say):
        self.metrics, self.world, self.p, self.budget, self.say = metrics, world, progress, budget, say
        self.interval_start = time.perf_counter()

    def event(self, name, **fields):
        """One line of metrics.jsonl, with where the run is."""
        if self.world.is_main:
            self.metrics.write(
                event=name, epoch=self.p.epoch, step=self.p.step, elapsed_s=self.budget.elapsed(), **fields
            )

    def start_interval(self):
        self.interval_start = time.perf_counter()

    def train(self, lr, norm, bar):
        """A "train" event with the mean loss since the last one, and the progress bar's figures."""
        p, now = self.p, time.perf_counter()
        mean = p.interval_loss / p.interval_tokens
        tps = p.interval_tokens / max(now - self.interval_start, 1e-9)
        self.event("train", split="train", loss=mean, ppl=perplexity(mean), lr=lr, tokens_per_s=tps, grad_norm=norm)
        bar.set_postfix(
            loss=f"{mean:.3f}", ppl=f"{perplexity(mean):.1f}", lr=f"{lr:.3g}", tok_s=f"{tps:,.0f}", refresh=False
        )
        p.interval_loss, p.interval_tokens = 0.0, 0
        self.interval_start = now

    def bad_step(self, result, lr, message):
        self.event(
            "bad_step",
            split="train",
            loss=result.loss if math.isfinite(result.loss) else None,
            lr=lr,
            grad_norm=result.grad_norm if math.isfinite(result.grad_norm) else None,
            bad_in_row=self.p.bad_in_row,
        )
        self.say(message)

    def valid(self, v, seconds, lr, improved):
        """A validation's event and line (``v``: its evaluation.Result)."""
        p = self.p
        train_ppl = perplexity(p.epoch_loss / p.epoch_tokens) if p.epoch_tokens else None
        self.event(
            "valid",
            split="valid",
            loss=v.loss,
            ppl=v.ppl,
            lr=lr,
            tokens_per_s=v.tokens / max(seconds, 1e-9),
            tokens=v.tokens,
            train_ppl=train_ppl,
        )
        self.say(
            f"epoch {p.epoch}: train ppl {train_ppl or math.nan:.2f} | valid ppl {v.ppl:.2f}"
            f"{' (best)' if improved else ''} | lr {lr:.4g} | {self.budget.elapsed():.0f}s"
        )

    def test(self, best, test, seconds):
        """The final test's event, at the best checkpoint's epoch and step, and its line."""
        if self.world.is_main:
            self.metrics.write(
                event="test",
                epoch=best.meta["epoch"],
                step=best.meta["step"],
                split="test",
                loss=test.loss,
                ppl=test.ppl,
                tokens_per_s=test.tokens / max(seconds, 1e-9),
                elapsed_s=self.budget.elapsed(),
                tokens=test.tokens,
            )
        self.say(
            f"test ppl {test.ppl:.2f} ({test.tokens:,} tokens) with the best checkpoint (step "
            f"{best.meta['step']}, valid ppl {best.meta['metrics']['best_valid_ppl']:.2f}); "
            f"{self.budget.elapsed():.0f}s in all"
        )
