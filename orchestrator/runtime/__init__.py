"""The composition root: builds every object from the settings (`compose`), hands them out as one container,
registers the scheduled jobs, and keeps the Prometheus metrics. The only layer that sees every other."""
