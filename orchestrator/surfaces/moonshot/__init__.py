"""Moonshot's connector surface: external OpenAI-compatible endpoints, saved and served by the gateway."""
