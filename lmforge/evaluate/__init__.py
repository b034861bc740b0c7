"""Evaluation: perplexity, task harness, judges, arena ratings, reports."""
