"""The Hyperstack LLM Inference Toolkit's own parts: its table browser."""
