"""The OpenAPI document at /schema and its pages: every route the server answers (Litestar's and the raw ASGI ones in
front of it), and the Swagger UI and ReDoc files served from this server. May import the rest of `api` and the
orchestrator's public names; nothing imports it but the app."""
