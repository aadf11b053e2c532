"""LiteLLM's proxy surface beyond the gateway's calls: the token counter."""
