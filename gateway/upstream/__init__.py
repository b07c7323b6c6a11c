"""Talking to upstream servers: wire dialects, retries, the HTTP transport and circuit breaking."""
