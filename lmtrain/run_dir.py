"""The run directory: never reusing another run's by accident, its metrics log, and what may change on resume.

    RUN_DIR/config.yaml            the resolved config
    RUN_DIR/vocab.json             the vocabulary
    RUN_DIR/metrics.jsonl          one JSON object per event
    RUN_DIR/checkpoints/*.npz      best.npz, last.npz, and numbered ones with train.keep_last
    RUN_DIR/.lock                  held by the process training in it (its id and host inside)

Only the process that writes (rank 0 under MPI) touches it, and only while it holds the lock.
"""

import glob
import json
import os
import shutil
import socket

from lmtrain.config import SAFE_TO_CHANGE_ON_RESUME, dump_yaml, flatten, shown
from lmtrain.errors import LmtrainError


class RunLock:
    """The run directory's lock, held for the life of the process that trains in it: a second `lmtrain fit`
    on the same directory (a requeued job while the first still runs) is refused instead of interleaving
    metrics.jsonl and replacing the first one's checkpoints.  An advisory lock (flock) on RUN_DIR/.lock:
    the operating system releases it when the process ends, however it ends."""

    NAME = ".lock"

    def __init__(self, run_dir):
        self.run_dir, self.fh, self.created = run_dir, None, not os.path.exists(run_dir)
        try:
            import fcntl
        except ImportError:  # not on this platform: no lock, as before
            return
        try:
            os.makedirs(run_dir, exist_ok=True)
            self.fh = open(os.path.join(run_dir, self.NAME), "a+", encoding="utf-8")
        except OSError as err:
            raise LmtrainError(f"cannot create run directory {run_dir}: {err.strerror}") from None
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise LmtrainError(
                f"run directory {run_dir} is in use by {holder}; wait for that run to end, or choose "
                f"another directory with --run-dir"
            ) from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self.fh.flush()

    def abandon(self):
        """The run never started: release the lock, and remove the directory if this lock created it and
        nothing else was written there."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            if self.created and os.listdir(self.run_dir) == [self.NAME]:
                shutil.rmtree(self.run_dir, ignore_errors=True)


def check_run_dir(run_dir, overwrite, resume):
    """Refuse, before any work, to start a run in a directory that holds another one, unless --resume or
    --overwrite say so."""
    used = [p for p in ("metrics.jsonl", "checkpoints") if os.path.exists(os.path.join(run_dir, p))]
    if used and not (overwrite or resume):
        raise LmtrainError(
            f"run directory {run_dir} already holds a run ({used[0]}); pass --resume to continue "
            f"it, --overwrite to replace it, or --run-dir to choose another"
        )


def prepare_run_dir(run_dir, overwrite, resume, cfg, vocab):
    """Create the run directory (replacing the run in it with ``overwrite``) and write the resolved config and
    the vocabulary into it."""
    check_run_dir(run_dir, overwrite, resume)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if overwrite:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            os.remove(path)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as err:
        raise LmtrainError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    # leftovers of a write that was killed half-way (the lock says no other process writes here)
    for tmp in glob.glob(os.path.join(ckpt_dir, ".*.tmp-*")):
        os.remove(tmp)
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dump_yaml(cfg))
    with open(os.path.join(run_dir, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab.to_dict(), fh)
    return ckpt_dir


def config_changes(old, new):
    """(unsafe, safe) lists of 'key: old -> new' between two config dicts."""
    a, b = flatten(old), flatten(new)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            change = f"{key}: {shown(a.get(key))} -> {shown(b.get(key))}"
            (safe if key in SAFE_TO_CHANGE_ON_RESUME else unsafe).append(change)
    return unsafe, safe


def well_formed(event):
    """Whether a line of metrics.jsonl is an event as lmtrain writes it (what resuming reads of it)."""
    number = (int, float, type(None))
    return (
        isinstance(event, dict)
        and isinstance(event.get("event"), str)
        and isinstance(event.get("step"), (int, type(None)))
        and not isinstance(event.get("step"), bool)
        and isinstance(event.get("elapsed_s"), number)
        and not isinstance(event.get("elapsed_s"), bool)
    )


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

    def read(self):
        """(events, torn): every event, and the text of a last line that was cut off while being written
        (power loss, a full disk), dropped, or None.  Any other line that is not an event is an error."""
        events, torn = [], None
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().split("\n")
        except OSError as err:
            raise LmtrainError(f"cannot read {self.path}: {err.strerror}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                event = None
            if well_formed(event):
                events.append(event)
            elif number == len(lines):  # the last line, with no line end after it
                torn = line
            else:
                raise LmtrainError(
                    f"{self.path}: line {number} is not an event; the file was damaged (keep a "
                    f"copy, then delete that line to resume)"
                )
        return events, torn

    def truncate_after(self, step):
        """Drop events a resumed run will produce again (those after its checkpoint), and a torn last line.

        Returns (the elapsed time of the last event kept, so the resumed run's clock continues from it; the
        number of bytes of a torn last line dropped, or 0).
        """
        if not os.path.exists(self.path):
            return 0.0, 0
        events, torn = self.read()
        kept = [e for e in events if (e.get("step") or 0) <= step and e.get("event") != "test"]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(tmp, self.path)
        elapsed = max((e.get("elapsed_s") or 0.0 for e in kept), default=0.0)
        return elapsed, len(torn.encode()) if torn else 0
