"""OpenAI-compatible inference router: load- and prefix-cache-aware, prefill/decode disaggregation."""
