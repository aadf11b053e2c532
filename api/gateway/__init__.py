"""The OpenAI-compatible gateway routes (seed 003 and the toolkit's chat), served as raw ASGI for speed."""
