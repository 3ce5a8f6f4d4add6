"""Corpora, vocabularies and batching."""
