"""Serving: an OpenAI-compatible HTTP server over the engine (`api.py`, batched by `batcher.py`) and a client
that uses any such server as a model (`client.py`)."""
