"""Writing a file so that a crash leaves either the old file or the new one, never half of one."""

import os


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file in the same directory, flush it to disk, then rename it
    to ``path`` (and flush the directory, so the rename survives a power loss)."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
