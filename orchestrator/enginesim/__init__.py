"""The vLLM-compatible engine simulator (OpenAI endpoints, `/tokenize`, `/metrics`, fault knobs, a request log):
the stand-in for vLLM where no GPU and no weights are. A program of its own (`python -m orchestrator.enginesim`,
`orchestrator engine-sim`) that imports nothing else of the orchestrator."""
