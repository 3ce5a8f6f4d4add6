"""Layers, recurrent cells and the language model, each with an explicit backward."""
