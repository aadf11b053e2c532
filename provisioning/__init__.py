"""SSH bootstrap of a managed replica's inference engine over paramiko. The only place that imports paramiko."""
