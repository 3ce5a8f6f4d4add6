"""Checkpoints: one .npz of named arrays, readable with numpy.load(path, allow_pickle=False).

Entries (see docs/checkpoint-format.md):
  meta           0-d unicode array: JSON text (format version, resolved config,
                 vocabulary, epoch, step, metrics, optimizer scalars)
  param/<name>   every model parameter
  optim/<name>   every optimizer state array (momentum, Adam moments)
  sha256         0-d unicode array: SHA-256 over every other entry

Files are written to a temporary name in the same directory, flushed to disk
and renamed over the target (lmtrain/files.py), so a crash leaves either the
old file or the new one, never half of one.  This module reads and writes
files only; lmtrain/build.py rebuilds the model a checkpoint describes.
"""

import hashlib
import json
import math
import zipfile
import zlib

import numpy as np

from lmtrain.backend import to_numpy
from lmtrain.config import shown
from lmtrain.errors import CheckpointError, LmtrainError, require_file
from lmtrain.files import atomic_write

FORMAT = "lmtrain-checkpoint"
FORMAT_VERSION = 1
GATE_ORDER = "f,i,o,g"


def _digest(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_npz(fh, arrays):
    """np.savez's layout, but with fixed zip timestamps so equal arrays give equal bytes."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)


def save_checkpoint(path, params, meta, groups=None):
    """Write parameters, other named arrays and JSON metadata to ``path`` atomically.

    ``groups`` maps a prefix to named arrays, e.g. {"optim": optimizer state,
    "state": carried hidden state}; they are stored as ``prefix/name``.
    """
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, gate_order=GATE_ORDER, param_names=list(params))
    arrays = {"meta": np.array(json.dumps(meta))}
    for name, value in params.items():
        arrays[f"param/{name}"] = to_numpy(value)
    for prefix, group in (groups or {}).items():
        for name, value in group.items():
            arrays[f"{prefix}/{name}"] = to_numpy(value)
    arrays["sha256"] = np.array(_digest(arrays))
    try:
        atomic_write(path, lambda fh: write_npz(fh, arrays))
    except OSError as err:
        raise LmtrainError(f"cannot write checkpoint {path}: {err.strerror or err}", exit_code=1) from None


class Checkpoint:
    """A verified checkpoint: ``meta`` (dict), ``params`` and ``groups[prefix]`` (name -> array)."""

    def __init__(self, path, meta, params, groups, sha256=""):
        self.path, self.meta, self.params, self.groups = path, meta, params, groups
        self.sha256 = sha256  # the verified checksum of the file's arrays

    def group(self, prefix):
        return self.groups.get(prefix, {})


MAX_MEMBERS = 100_000  # arrays in a checkpoint: a few per parameter


def read_arrays(path):
    """Every array of the .npz at ``path``, each checked before it is read: a member of a zip, a plain .npy
    of numbers or text (an object array would be a pickle, which can run code) whose header claims no more
    than the member holds, with the zip's CRC verified as it is read.  Anything else is a CheckpointError."""
    with open(path, "rb") as fh:
        if fh.read(6) == b"\x93NUMPY":
            raise CheckpointError(f"{path} is a single .npy array, not an lmtrain checkpoint")
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise CheckpointError(f"{path} has {len(infos):,} members, more than a checkpoint ever has")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{path} holds {shown(info.filename)}, which is not an array")
            with zf.open(info) as member:
                arrays[info.filename[:-4]] = _read_member(path, info, member)
    return arrays


def _read_member(path, info, member):
    name = info.filename[:-4]
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(member)
    if version not in readers:
        raise CheckpointError(f"{path}: {shown(name)} has .npy format version {version}")
    shape, fortran, dtype = readers[version](member)
    if dtype.hasobject:
        raise CheckpointError(
            f"{path} holds a pickled object in {shown(name)}; lmtrain never loads "
            "pickles (they can run code), so the file is refused"
        )
    size = math.prod(shape) * dtype.itemsize
    if size != info.file_size - member.tell():
        raise CheckpointError(
            f"{path}: {shown(name)} claims shape {shown(shape)} ({size:,} bytes) but holds "
            f"{max(info.file_size - member.tell(), 0):,} bytes: the file was damaged"
        )
    data = member.read(size)
    if len(data) != size or member.read(1):
        raise CheckpointError(f"{path}: {shown(name)} is shorter or longer than its header says")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()


def load_checkpoint(path):
    """Read and verify a checkpoint; anything unexpected is a one-line CheckpointError (exit 2)."""
    path = require_file(path, "checkpoint", CheckpointError)
    try:
        arrays = read_arrays(path)
    except CheckpointError:
        raise
    except (
        zipfile.BadZipFile,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        zlib.error,
        RuntimeError,
        NotImplementedError,
        MemoryError,
        OverflowError,
    ) as err:
        raise CheckpointError(
            f"{path} is not a readable .npz file (truncated or corrupt?): "
            f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}"
        ) from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is not an lmtrain checkpoint (it has no 'meta' entry)")
    try:
        meta = json.loads(str(arrays["meta"]))
    except (TypeError, ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise CheckpointError(f"{path} is not an lmtrain checkpoint (its 'meta' entry is not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lmtrain checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('format_version')!r}; "
            f"this lmtrain reads version {FORMAT_VERSION}"
        )
    stored = arrays.pop("sha256", None)
    if stored is None or str(stored) != _digest(arrays):
        raise CheckpointError(f"{path} fails its SHA-256 check: the file was modified or damaged")
    groups = {}
    for key, value in arrays.items():
        if "/" in key:
            prefix, name = key.split("/", 1)
            groups.setdefault(prefix, {})[name] = value
    params = groups.pop("param", {})
    missing = [n for n in meta.get("param_names", []) if n not in params]
    if missing:
        raise CheckpointError(f"{path} lacks parameter '{missing[0]}'")
    return Checkpoint(path, meta, params, groups, str(stored))
