"""One engine per training process: each process samples its share of a call's prompts with
its own engine, and the shares are gathered back, in prompt order, on every process.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from online_dpo.data.prompts import Prompt
from online_dpo.engines.generate import Completion, Generator, Sampling
from online_dpo.seeds import stable_seed


def rank_share(count: int, rank: int, ranks: int) -> slice:
    """The contiguous slice of `count` items that process `rank` of `ranks` takes: the first
    count % ranks processes take one more, so the shares differ by at most one."""
    base, extra = divmod(count, ranks)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def rank_sampling(sampling: Sampling, rank: int) -> Sampling:
    """Process `rank`'s sampling: its own seed, so no two processes draw the same random
    stream; process 0 keeps the call's seed (one process samples as it always did)."""
    return sampling if rank == 0 else dataclasses.replace(sampling, seed=stable_seed(sampling.seed, "rank", rank))


class EveryRank:
    """A Generator over one engine per process. `generate` is a collective: every process
    calls it with the same prompts, generates its `rank_share` with its own engine, and gets
    every prompt's completions back. The weights are pushed to each process's own engine."""

    def __init__(self, local: Generator, accelerator):
        self.local = local
        self.accelerator = accelerator

    @property
    def version(self) -> str | None:
        return self.local.version

    @version.setter
    def version(self, value: str | None) -> None:
        self.local.version = value

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[list[Completion]]:
        from accelerate.utils import gather_object

        rank, ranks = self.accelerator.process_index, self.accelerator.num_processes
        share = prompts[rank_share(len(prompts), rank, ranks)]
        mine = self.local.generate(share, rank_sampling(sampling, rank)) if share else []
        # gather_object concatenates the processes' lists in rank order: prompt order again
        gathered = gather_object(mine)
        if len(gathered) != len(prompts):
            raise RuntimeError(f"the processes returned {len(gathered)} prompts' completions for {len(prompts)} prompts")
        return gathered

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        self.local.update_weights(weights, version)
