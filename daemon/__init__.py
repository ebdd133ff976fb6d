"""agentd: persistent LLM agents whose KV caches survive restarts."""

__version__ = "0.1.0"
