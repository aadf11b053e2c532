"""LiteLLM's proxy routes that are not the gateway's raw ASGI calls (`/utils/token_counter`)."""
