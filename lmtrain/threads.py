"""How many threads lmtrain's work runs on, and how idle threads wait.

Imported by ``lmtrain/__init__.py``, so before numpy loads OpenBLAS: OpenBLAS's worker threads busy-wait
for about 2^28 cycles (~0.1 s) after every product before they sleep, holding a core that the passes
lmtrain splits over threads right after a product (the softmax after the decoder, the update) need, so
on a machine with few cores those passes wait for it.  2^16 cycles still spans the gap between one time step's
product and the next.  OpenBLAS reads the variable when numpy loads, so it takes effect when lmtrain
is imported first (the CLI always is); a value already set wins.  GNU OpenMP's threads, which run the
fast path's self-splitting kernels, get the same treatment: its default of 300,000 spins holds a core
for milliseconds through the OpenBLAS product that follows; 10,000 still spans the gap between two
time steps.  ``lmtrain bench`` measures the effect (docs/performance.md).
"""

import os
import sys

# Whether OpenBLAS's spin was shortened: not where numpy was loaded first (and nobody set the
# variable), as a program using lmtrain as a library may do.  The fast path then leaves the time
# step's products to BLAS, since OpenMP's threads there would compete with OpenBLAS's spinning ones.
SHORT_SPINS = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


# numpy's element-wise loops run on one core but release the GIL, so large passes (the softmax over
# the vocabulary, the update) are split over threads by rows.  LMTRAIN_NUM_THREADS overrides the
# count; 1 turns the splitting off.
def _default_threads():
    env = os.environ.get("LMTRAIN_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


NUM_THREADS = _default_threads()
_pool = None
_listeners = []  # called with the new count by set_threads (the fast path's own thread setting)


def on_change(fn):
    """Call ``fn(n)`` now and whenever ``set_threads`` changes the count."""
    _listeners.append(fn)
    fn(NUM_THREADS)


def set_threads(n):
    """Use ``n`` threads for BLAS products, for the passes split by ``parallel_rows`` and in the fast
    path's kernels.  numpy has loaded OpenBLAS by now, so its count is set through OpenBLAS's own call;
    the environment variables are set too, for processes this one starts."""
    global NUM_THREADS, _pool
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "LMTRAIN_NUM_THREADS"):
        os.environ[var] = str(n)
    if _pool is not None and n != NUM_THREADS:
        _pool.shutdown()
        _pool = None
    NUM_THREADS = n
    _openblas_call("set_num_threads", n)
    for fn in _listeners:
        fn(n)


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
