"""The run directory: never reusing another run's by accident, its metrics log, and what may change on resume.

    RUN_DIR/config.yaml            the resolved config
    RUN_DIR/vocab.json             the vocabulary
    RUN_DIR/metrics.jsonl          one JSON object per event
    RUN_DIR/checkpoints/*.npz      best.npz, last.npz, and numbered ones with train.keep_last

Only the process that writes (rank 0 under MPI) touches it.
"""

import glob
import json
import os
import shutil

from lmtrain.config import SAFE_TO_CHANGE_ON_RESUME, dump_yaml, flatten
from lmtrain.errors import LmtrainError


def prepare_run_dir(run_dir, overwrite, resume):
    """Create the run directory; never reuse another run's without --resume or --overwrite."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    used = [p for p in ("metrics.jsonl", "checkpoints") if os.path.exists(os.path.join(run_dir, p))]
    if used and not (overwrite or resume):
        raise LmtrainError(
            f"run directory {run_dir} already holds a run ({used[0]}); pass --resume to continue "
            f"it, --overwrite to replace it, or --run-dir to choose another"
        )
    if used and overwrite:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as err:
        raise LmtrainError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    # leftovers of a write that was killed half-way
    for tmp in glob.glob(os.path.join(ckpt_dir, ".*.tmp-*")):
        os.remove(tmp)
    return ckpt_dir


def write_run_files(run_dir, cfg, vocab):
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dump_yaml(cfg))
    with open(os.path.join(run_dir, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab.to_dict(), fh)


def config_changes(old, new):
    """(unsafe, safe) lists of 'key: old -> new' between two config dicts."""
    a, b = flatten(old), flatten(new)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            (safe if key in SAFE_TO_CHANGE_ON_RESUME else unsafe).append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return unsafe, safe


class MetricsLog:
    """metrics.jsonl: one JSON object per event, appended as it happens.

    Every event has at least the keys of FIELDS (None where they do not apply).
    """

    FIELDS = ("event", "epoch", "step", "split", "loss", "ppl", "lr", "tokens_per_s", "elapsed_s")

    def __init__(self, path):
        self.path = path

    def write(self, **event):
        record = {k: None for k in self.FIELDS}
        record.update(event)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step):
        """Drop events a resumed run will produce again (those after its checkpoint).

        Returns the elapsed time of the last event kept, so the resumed run's clock continues from it.
        """
        if not os.path.exists(self.path):
            return 0.0
        with open(self.path, encoding="utf-8") as fh:
            events = [json.loads(line) for line in fh if line.strip()]
        kept = [e for e in events if (e.get("step") or 0) <= step and e.get("event") != "test"]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(tmp, self.path)
        return max((e.get("elapsed_s") or 0.0 for e in kept), default=0.0)
