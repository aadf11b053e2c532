"""The control plane: the models and replicas services, the reconcile steps along the lifecycle, managed VMs
(provision, bootstrap, secure, recover, destroy) over the backend contract, health probes, security rule sets,
draining, the fleet-wide sweeps, SSH access and engine plans. Imports `gateway` and below, `infra` and
`provisioning`; never `surfaces`."""
