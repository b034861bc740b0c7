"""lmforge: the whole life of a text foundation model, measured, in one place."""

__version__ = "0.1.0"
