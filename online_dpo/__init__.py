"""online-dpo: online, iterative DPO with AI feedback."""

__version__ = "0.1.0"
