"""What calls cost and who may make them: the ledger (spend in flight, holds), the call records and their
journal (nothing answered is lost or charged twice), and the services that issue client API keys and keep the
connector's accounts. Imports `store`, `platform`, `domain`."""
