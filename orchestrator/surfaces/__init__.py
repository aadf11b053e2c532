"""What exists for one outside API only: LlmEndpoint's completions and durable task queue, LiteLLM's token
counter, Moonshot's external endpoints, and Feishu (its client and the bots). Imports `gateway` and below; never
`fleet`."""
