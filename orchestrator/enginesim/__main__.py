"""`python -m orchestrator.enginesim`: the engine simulator's command (`orchestrator engine-sim` is the same)."""

from orchestrator.enginesim.server import engine_sim_command

engine_sim_command()
