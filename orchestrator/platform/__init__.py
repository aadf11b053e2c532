"""What every part stands on: the settings, logging, the state directory and the server's own keys, secrets
(API-key material and the secret box) and the outbound policy (where an admin may point the orchestrator, checked
again at every connect). Imports `domain` only."""
