"""The orchestrator: everything below the HTTP edge, in layers by concept. From the bottom: `domain` (pure rules),
`platform` (settings, logs, secrets, outbound policy), `store` (all SQL), `billing` (call records, spend, keys),
`gateway` (the in-memory data path), then `fleet` (the control plane) and `surfaces` (what exists for one outside
API only) side by side, and `runtime` (the composition root) on top. A layer imports only the layers below it
(`pyproject.toml`'s import-linter contracts); `enginesim` imports nothing of the orchestrator. The map is
`docs/architecture.md`."""
