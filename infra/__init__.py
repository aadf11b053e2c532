"""VM backends: Pulumi programs per cloud and the local sandbox (issue 5). The only place that imports pulumi."""
