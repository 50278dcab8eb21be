"""OpenAI-compatible HTTP server over the decoding engine (FastAPI)."""
