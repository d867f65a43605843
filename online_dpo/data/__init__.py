"""Prompts: where they come from (`sources`), the built-in tasks (`tasks`), and the train/eval split (`prompts`)."""

from online_dpo.data.prompts import Prompt, PromptSplit, SourceReport, chat_prompt_ids, prompt_lengths
from online_dpo.data.sources import BUILTIN_TASKS, load_prompts
from online_dpo.data.tasks.arithmetic import arithmetic_split
from online_dpo.data.tasks.instructions import instructions_split
from online_dpo.errors import DataError

__all__ = ["BUILTIN_TASKS", "DataError", "Prompt", "PromptSplit", "SourceReport", "arithmetic_split",
           "chat_prompt_ids", "instructions_split", "load_prompts", "prompt_lengths"]
