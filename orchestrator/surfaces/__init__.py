"""What exists for one outside API only: the toolkit's table browser, LlmEndpoint's completions and durable task
queue, LiteLLM's token counter, Moonshot's external endpoints, and Feishu (its client, the bots and the receiver
that answers their events through the gateway). Imports `gateway` and below; never `fleet`."""
