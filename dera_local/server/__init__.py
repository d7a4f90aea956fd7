"""A local OpenAI-compatible HTTP server for a DeRa pair (needs the `server` extra)."""
