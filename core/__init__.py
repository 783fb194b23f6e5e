"""The provisioning core: the Nushell business-logic library, its action registry and runner."""

from pathlib import Path

NULIB_DIR = Path(__file__).parent / "nulib"
INFRA_DIR = Path(__file__).parent / "infra"
WORKFLOWS_DIR = Path(__file__).parent / "workflows"

__all__ = ["INFRA_DIR", "NULIB_DIR", "WORKFLOWS_DIR"]
