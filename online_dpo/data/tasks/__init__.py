"""Built-in prompt tasks: each builds a seeded `PromptSplit` from the data config."""
