"""The HTTP edge: the Litestar app, each API surface's routes and envelopes, and the CLI."""
