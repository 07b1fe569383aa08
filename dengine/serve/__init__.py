"""Serving: the OpenAI-compatible API (server.py), its wire format (protocol.py) and the Ray Serve
deployment (deployment.py, needs the `serve` extra)."""
