"""The array module, chosen in one place.

Every numerical module does ``from lmtrain.backend import xp`` and uses
``xp.zeros``, ``xp.exp``... instead of importing numpy directly, so a GPU
backend (CuPy has numpy's interface) can be swapped in here without touching
the layers.  Host-side code that only handles token ids or file formats may use
numpy directly.
"""
import numpy

xp = numpy


def to_numpy(array):
    """Bring an array back to host memory as a numpy array (identity on numpy)."""
    return numpy.asarray(array)


# numpy's element-wise loops run on one core but release the GIL, so large
# passes (the softmax over the vocabulary) are split over threads by rows.
# LMTRAIN_NUM_THREADS overrides the count; 1 turns the splitting off.
def _default_threads():
    import os
    env = os.environ.get("LMTRAIN_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


NUM_THREADS = _default_threads()
_pool = None


def set_threads(n):
    """Use ``n`` threads for BLAS products, for the passes split by ``parallel_rows`` and in the kernels.

    numpy has loaded OpenBLAS by now, so its count is set through OpenBLAS's
    own call; the environment variables are set too, for processes this one
    starts.
    """
    import os
    global NUM_THREADS, _pool
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "LMTRAIN_NUM_THREADS"):
        os.environ[var] = str(n)
    if _pool is not None and n != NUM_THREADS:
        _pool.shutdown()
        _pool = None
    NUM_THREADS = n
    _openblas_call("set_num_threads", n)
    if _fused:
        _fused.set_threads(n)


def blas_threads():
    """Threads OpenBLAS uses now (None where it cannot be asked)."""
    return _openblas_call("get_num_threads")


def _openblas_call(what, *args):
    """Call openblas_<what> in the OpenBLAS that numpy loaded (its symbols carry a prefix and suffix in
    numpy's wheels), found among the process's mapped libraries as threadpoolctl finds it; Linux only."""
    import ctypes
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                fn = getattr(lib, prefix + what + suffix, None)
                if fn is not None:
                    return fn(*map(ctypes.c_int, args))
    return None


def parallel_rows(fn, n_rows, row_size):
    """Call ``fn(start, stop)`` on row ranges covering ``range(n_rows)``, in threads when worth it."""
    global _pool
    chunks = min(NUM_THREADS, n_rows)
    if chunks < 2 or n_rows * row_size < 200_000:
        fn(0, n_rows)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(NUM_THREADS, thread_name_prefix="lmtrain")
    bounds = [n_rows * k // chunks for k in range(chunks + 1)]
    futures = [_pool.submit(fn, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()


# Fused element-wise kernels (lmtrain/nn/fused.py, compiled by numba: the optional `fast` extra) stand
# in for numpy's chains of element-wise calls where numba is installed.  They are chosen once, on first
# use, so a process without numba never imports it.
KERNEL_CHOICES = ("auto", "numba", "numpy")
_fused = False  # not chosen yet; then the kernels module, or None for the numpy path


def use_kernels(setting="auto"):
    """Choose the element-wise path and return its name, "numba" or "numpy".

    ``setting`` (train.kernels) is one of KERNEL_CHOICES; the environment variable LMTRAIN_KERNELS,
    when set, overrides it.  "auto" takes numba when it imports, "numba" insists on it.
    """
    import os
    from lmtrain.errors import ConfigError
    global _fused
    env = os.environ.get("LMTRAIN_KERNELS")
    chosen = env or setting
    if chosen not in KERNEL_CHOICES:
        where = "LMTRAIN_KERNELS" if env else "train.kernels"
        raise ConfigError(f"{where} is {chosen!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    _fused = None
    if chosen != "numpy":
        try:
            from lmtrain.nn import fused as module
        except ImportError as e:
            if chosen == "numba":
                raise ConfigError(f"the numba kernels were asked for but cannot be loaded ({e}): "
                                  "pip install -e '.[fast]', or set train.kernels to auto") from None
        else:
            _fused = module
            module.set_threads(NUM_THREADS)
    return kernels_in_use()


def fused():
    """The fused kernels module when in use, else None (the numpy path)."""
    if _fused is False:
        use_kernels()
    return _fused


def kernels_in_use():
    return "numpy" if fused() is None else "numba"
