"""Pure rules, no I/O: the domain errors, the replica lifecycle (statuses and allowed moves), money as exact
integers and the spend rule of an account. Imports nothing else of the orchestrator and nothing that does I/O."""
