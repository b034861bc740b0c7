"""Inference: sampling, the engine, scoring, prompting."""
