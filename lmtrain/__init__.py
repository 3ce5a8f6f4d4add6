"""lmtrain: word-level LSTM language models in readable numpy."""

from lmtrain import threads  # noqa: F401  first, before numpy loads: it sets how idle threads wait

__version__ = "0.2.0"
