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
