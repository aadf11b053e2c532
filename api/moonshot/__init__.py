"""Moonshot's (AI Verify) connector endpoints, `/v1/connectors` and `/v1/llm_endpoints`, admin only."""
