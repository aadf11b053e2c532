"""SSH bootstrap of the inference engine over paramiko (issue 5). The only place that imports paramiko."""
