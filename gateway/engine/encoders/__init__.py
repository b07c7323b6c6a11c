"""Encoder models: embeddings (embedder.py), the other per-request tasks (tasks/), and the micro-batcher
that lets concurrent requests share their forward passes (microbatch.py)."""
