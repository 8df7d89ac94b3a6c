"""LLM gateway usage exporter."""

__version__ = "0.1.0"
