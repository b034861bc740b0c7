"""Data: the embedded world, corpora, instructions, preferences."""
