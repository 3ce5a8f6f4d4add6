"""The array module, chosen in one place.

Every numerical module does ``from lmtrain.backend import xp`` and uses ``xp.zeros``, ``xp.exp``...
instead of importing numpy directly, so a GPU backend (CuPy has numpy's interface) can be swapped in
here without touching the layers.  Host-side code that only handles token ids or file formats may use
numpy directly.
"""

import numpy

xp = numpy


def to_numpy(array):
    """Bring an array back to host memory as a numpy array (identity on numpy)."""
    return numpy.asarray(array)
