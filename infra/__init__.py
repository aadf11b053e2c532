"""Managed replicas' VM backends: a Pulumi program per cloud, the local sandbox. The only place that imports pulumi."""
