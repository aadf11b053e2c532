"""LlmEndpoint's surface: completions priced in credits, and the durable task queue of them."""
