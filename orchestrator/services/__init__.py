"""Use cases of the admin API, one module per entity; each takes the store and raises domain errors."""
