"""Serving: an OpenAI-compatible HTTP API and a browser playground over the continuous-batching engine."""

from lmforge.serve.app import create_app, load_served, serve

__all__ = ["create_app", "load_served", "serve"]
