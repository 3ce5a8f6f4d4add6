"""lmtrain: word-level LSTM language models in readable numpy."""
import os as _os
import sys as _sys

# OpenBLAS's worker threads busy-wait for about 2^28 cycles (~0.1 s) after
# every product before they sleep, holding a core that the passes lmtrain
# splits over threads right after a product (the softmax after the decoder,
# the update) need: on 2 cores those passes ran almost 2x slower.  2^16 cycles
# still spans the gap between one time step's product and the next.  OpenBLAS
# reads this when numpy loads, so it takes effect when lmtrain is imported
# first (the CLI always is); a value already set wins.  docs/performance.md.
# Whether that took effect: not where numpy was imported first (and nobody set the variable), as a
# program using lmtrain as a library may do; then the time step's products stay with BLAS
# (cells.StepProducts), since OpenMP's threads there would compete with OpenBLAS's spinning ones.
OPENBLAS_SPINS_SHORT = "numpy" not in _sys.modules or "OPENBLAS_THREAD_TIMEOUT" in _os.environ
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")
# The same for OpenMP's threads, which run the kernels that split themselves (lmtrain/nn/fused.py): GNU
# OpenMP's default of 300,000 spins holds a core for milliseconds after each of them, through the
# OpenBLAS product that follows; 10,000 still spans the gap between two time steps.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
