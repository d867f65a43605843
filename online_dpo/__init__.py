"""online-dpo: online, iterative DPO with AI feedback.

The Python API (online_dpo/api.py): `load_config`, `run` (with any judge object or scoring
function), `resume` and `results`."""

from online_dpo.api import load_config, results, resume, run

__version__ = "0.1.0"
__all__ = ["load_config", "results", "resume", "run"]
