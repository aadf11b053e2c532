"""The `hyperstack` VM backend: a Pulumi stack per replica over dynamic providers for the Hyperstack REST API."""

from infra.hyperstack.backend import HyperstackBackend, HyperstackConfig

__all__ = ["HyperstackBackend", "HyperstackConfig"]
