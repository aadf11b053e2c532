"""The `machine` backend: each VM a booted Debian machine (`backend.py`) made from a cached image (`image.py`)."""

from infra.machine.backend import MachineBackend, MachineConfig
from infra.machine.image import ImageRecipe

__all__ = ["ImageRecipe", "MachineBackend", "MachineConfig"]
