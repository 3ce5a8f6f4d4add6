"""lmtrain: word-level LSTM language models in readable numpy."""
__version__ = "0.1.0"
