"""Saving and restoring a run: one checkpoint file from each part's own ``state_dict``.

A part's state is {"arrays": named arrays, "scalars": JSON-able values}; the checkpoint stores each
part's arrays under its prefix and its scalars under its key of ``meta`` (docs/checkpoint-format.md):

    part        arrays under   scalars in meta
    progress    -              "progress"
    schedule    -              "schedule"
    optimizer   optim/         "optimizer"
    streams     state/         -
    generators  -              merged: "rng", "rank_dropout_rng"

Rank 0 writes what every rank holds: the streams' states and the generators are gathered from all ranks
(collectives), the rest is the same everywhere.
"""

import glob
import os

from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.errors import LmtrainError

WHERE = {
    "progress": (None, "progress"),
    "schedule": (None, "schedule"),
    "optimizer": ("optim", "optimizer"),
    "streams": ("state", None),
    "generators": (None, None),
}
GATHERED = ("streams", "generators")  # their state_dict is a collective


class Checkpointer:
    def __init__(self, ckpt_dir, world, cfg, vocab, parts, keep_last=0):
        """``parts``: {name in WHERE: object with state_dict() and load_state_dict(state)}."""
        self.dir, self.world, self.cfg, self.vocab, self.parts = ckpt_dir, world, cfg, vocab, parts
        self.keep_last = keep_last

    def path(self, name):
        return os.path.join(self.dir, name)

    def save(self, name):
        """Write a resumable checkpoint ``name`` (a collective); returns its path on rank 0, else None."""
        states = {part: self.parts[part].state_dict() for part in GATHERED}
        if not self.world.is_main:
            return None
        states.update({part: obj.state_dict() for part, obj in self.parts.items() if part not in GATHERED})
        meta = {"config": self.cfg.to_dict(), "vocab": self.vocab.to_dict(), **self.parts["progress"].summary()}
        groups = {}
        for part, (prefix, key) in WHERE.items():
            if prefix:
                groups[prefix] = states[part]["arrays"]
            if key:
                meta[key] = states[part]["scalars"]
            elif not prefix:
                meta.update(states[part]["scalars"])
        meta["world_size"] = self.world.size
        path = self.path(name)
        optimizer = self.parts["optimizer"]
        with optimizer.averaged():  # averaged SGD: the file's weights are the averaged ones
            save_checkpoint(path, optimizer.store.params, meta, groups)
        return path

    def save_periodic(self, step):
        """last.npz, and with train.keep_last a numbered one, the oldest numbered ones removed."""
        self.save("last.npz")
        if self.keep_last:
            self.save(f"step-{step:08d}.npz")
            numbered = sorted(glob.glob(os.path.join(self.dir, "step-*.npz"))) if self.world.is_main else []
            for old in numbered[: -self.keep_last]:
                os.remove(old)

    def load(self, name):
        """Checkpoint ``name`` of this run, read on rank 0 and given to every rank."""
        return self.world.on_main(lambda: load_checkpoint(self.path(name)))

    def restore(self, model, ckpt):
        """Continue from a checkpoint written by ``save``: the parameters, then every part."""
        meta = ckpt.meta
        if "progress" not in meta:
            raise LmtrainError(f"{ckpt.path} cannot be resumed from (it has no training state)")
        model.load_params(ckpt.params)
        for name, part in self.parts.items():
            prefix, key = WHERE[name]
            part.load_state_dict(
                {"arrays": ckpt.group(prefix) if prefix else {}, "scalars": meta[key] if key else meta}
            )
