"""The Hyperstack LLM Inference Toolkit admin API, mounted at /api/v1 in its own shapes."""
