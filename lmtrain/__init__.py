"""lmtrain: word-level LSTM language models in readable numpy."""
import os as _os

# OpenBLAS's worker threads busy-wait for about 2^28 cycles (~0.1 s) after
# every product before they sleep, holding a core that the passes lmtrain
# splits over threads right after a product (the softmax after the decoder,
# the update) need: on 2 cores those passes ran almost 2x slower.  2^16 cycles
# still spans the gap between one time step's product and the next.  OpenBLAS
# reads this when numpy loads, so it takes effect when lmtrain is imported
# first (the CLI always is); a value already set wins.  docs/performance.md.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

__version__ = "0.1.0"
