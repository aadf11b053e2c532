"""The OpenAI-compatible gateway routes (LiteLLM's proxy paths and the toolkit's chat), served as raw ASGI for speed."""
