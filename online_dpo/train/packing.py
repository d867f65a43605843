"""Packing pairs (and KTO's examples) into shared-prompt rows and batches.

One row per pair holds its prompt once, then the chosen and then the rejected response:
    [prompt | chosen | rejected | pad]
Each response's position ids continue from the prompt's end, and the attention mask lets a
response token see the prompt and the earlier tokens of its own response only. So each
response gets exactly the log-probs of (prompt + response) run as a sequence of its own,
while the prompt runs once per pair instead of twice and a row pads only to the longest
pair. KTO's unpaired examples use the same rows with a single response.

Shapes: B = pairs in a batch, N = rows, T = row length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("online_dpo")

PROMPT, PAD = 0, -1  # segment ids; the responses of a row are 1, 2, ...


@dataclass
class Rows:
    """Right-padded shared-prompt rows, each [N, T].

    input_ids; position_ids (a response's positions continue from its prompt's end);
    segment (PROMPT, 1..m for the row's responses, PAD); predictor: for each response token,
    the index of the position whose logits predict it (the previous token of its own
    response, or the prompt's last token for its first token); 0 elsewhere."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    predictor: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens the model runs on (pads excluded): the prompt counts once per row."""
        return int((self.segment != PAD).sum())

    def response_lengths(self, segments: int) -> torch.Tensor:
        """[N, segments]: the number of tokens of each response."""
        ids = torch.arange(1, segments + 1, device=self.segment.device)
        return (self.segment.unsqueeze(-1) == ids).sum(1)

    def select(self, index) -> Rows:
        return Rows(self.input_ids[index], self.position_ids[index], self.segment[index], self.predictor[index])

    def to(self, device) -> Rows:
        return Rows(self.input_ids.to(device), self.position_ids.to(device), self.segment.to(device),
                    self.predictor.to(device))


def pack_rows(rows: list[tuple[list[int], list[list[int]]]], pad_id: int) -> Rows:
    """(prompt_ids, [response_ids, ...]) per row -> `Rows` [N, T], T = the longest row."""
    width = max(len(prompt) + sum(map(len, responses)) for prompt, responses in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, PAD, dtype=torch.long)
    pred = torch.zeros(shape, dtype=torch.long)
    for i, (prompt, responses) in enumerate(rows):
        n = len(prompt)
        ids[i, :n], pos[i, :n], seg[i, :n] = torch.tensor(prompt), torch.arange(n), PROMPT
        at = n
        for s, response in enumerate(responses, start=1):
            k = len(response)
            if not k:
                continue
            ids[i, at:at + k] = torch.tensor(response)
            pos[i, at:at + k] = torch.arange(n, n + k)
            seg[i, at:at + k] = s
            pred[i, at:at + k] = torch.arange(at - 1, at + k - 1)
            pred[i, at] = n - 1  # every response's first token is predicted by the prompt's last
            at += k
    return Rows(ids, pos, seg, pred)


def shared_prompt_mask(segment: torch.Tensor) -> torch.Tensor:
    """[N, T] segments -> [N, 1, T, T] bool (True = may attend): query i sees key j iff j <= i
    and j is in the prompt or in i's own response. A pad sees the prompt and earlier pads, so
    no row of the mask is empty (an empty row would make the attention NaN), and no token
    outside the pads sees a pad."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    return (causal & ((key == PROMPT) | (key == query))).unsqueeze(1)


def encode_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int):
    """(prompt, chosen, rejected) for one pair; each response is cut so that prompt + response
    fits `max_length` (the length each response is scored at)."""
    room = response_room(prompt_ids, max_length)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


def response_room(prompt_ids: list[int], max_length: int) -> int:
    """How many response tokens fit after the prompt under `max_length` (at least 1, or an error)."""
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under dpo.max_length={max_length}")
    return room


@dataclass
class PairBatch:
    """B pairs, one shared-prompt row each (`Rows`: segment 1 = chosen, 2 = rejected).
    chosen_prob [B]: the label of each pair (1.0 = chosen preferred, 0.5 = a kept tie).
    chosen_nll_weight [B]: the weight of each pair's chosen-response NLL term (1.0, or 0.0 for a
    pair of a prompt the judge did not separate)."""

    rows: Rows
    chosen_prob: torch.Tensor | None = None
    chosen_nll_weight: torch.Tensor | None = None
    segments = 2

    def __post_init__(self):
        if self.chosen_prob is None:
            self.chosen_prob = torch.ones(self.num_pairs)
        if self.chosen_nll_weight is None:
            self.chosen_nll_weight = torch.ones(self.num_pairs)

    @property
    def num_pairs(self) -> int:
        return self.rows.num_rows

    num_items = num_pairs  # what the update counts, weights and shards by

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row values [B, 2] -> (chosen [B], rejected [B])."""
        return logps[:, 0], logps[:, 1]

    @property
    def has_soft_labels(self) -> bool:
        return bool((self.chosen_prob != 1).any())

    def to(self, device) -> PairBatch:
        return PairBatch(self.rows.to(device), self.chosen_prob.to(device), self.chosen_nll_weight.to(device))

    def shard(self, index: int, count: int) -> PairBatch:
        """Process `index` of `count`'s equal share of the pairs (contiguous, in order); the
        padded width is kept, so every process runs the same shapes."""
        lo, hi = shard_range(self.num_pairs, index, count)
        return PairBatch(self.rows.select(slice(lo, hi)), self.chosen_prob[lo:hi], self.chosen_nll_weight[lo:hi])


def shard_range(num_pairs: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of the pairs process `index` of `count` takes; the split must be even."""
    if num_pairs % count:
        raise ValueError(
            f"a batch of {num_pairs} pairs cannot be split evenly over {count} processes; "
            f"set dpo.batch_size to a multiple of {count} (and build batches with make_batches(..., num_processes={count}))")
    share = num_pairs // count
    return index * share, (index + 1) * share


def collate_pairs(encoded: list, pad_id: int, chosen_prob: list[float] | None = None,
                  chosen_nll_weight: list[float] | None = None) -> PairBatch:
    """`encoded`: (prompt_ids, chosen_ids, rejected_ids) per pair (`encode_pair`) -> PairBatch.
    `chosen_prob`, `chosen_nll_weight`: one value per pair each (default 1.0 each)."""
    def per_pair(values):
        return torch.tensor(values, dtype=torch.float32) if values is not None else None

    rows = pack_rows([(p, [c, r]) for p, c, r in encoded], pad_id)
    return PairBatch(rows, per_pair(chosen_prob), per_pair(chosen_nll_weight))


@dataclass
class ExampleBatch:
    """Unpaired examples (KTO): one row per response (`Rows` with one response, segment 1);
    desirable [N] bool (the judge's label)."""

    rows: Rows
    desirable: torch.Tensor
    segments = 1

    @property
    def num_items(self) -> int:
        return self.rows.num_rows

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor]:
        return (logps[:, 0],)

    def to(self, device) -> ExampleBatch:
        return ExampleBatch(self.rows.to(device), self.desirable.to(device))

    def shard(self, index: int, count: int) -> ExampleBatch:
        """Process `index` of `count`'s equal, contiguous share of the examples (padded width kept)."""
        lo, hi = shard_range(self.num_items, index, count)
        return ExampleBatch(self.rows.select(slice(lo, hi)), self.desirable[lo:hi])


def make_example_batches(examples: list[dict], prompt_ids: dict[str, list[int]], *, batch_size: int, max_length: int,
                         pad_id: int, seed: int, num_processes: int = 1) -> tuple[list[ExampleBatch], list[int]]:
    """Shuffle labelled examples with `seed` and cut them into batches of `batch_size`
    examples (the same order and the same even-split rule as `make_batches`).
    Returns (batches, order): order[i] is the index in `examples` of the i-th batched example."""
    order = even_order(len(examples), batch_size, seed, num_processes, "examples")
    rows, labels = [], []
    for i in order:
        prompt = prompt_ids[examples[i]["prompt_id"]]
        rows.append((prompt, [list(examples[i]["completion_token_ids"])[: response_room(prompt, max_length)]]))
        labels.append(bool(examples[i]["label"]))
    batches = [ExampleBatch(pack_rows(rows[i : i + batch_size], pad_id),
                            torch.tensor(labels[i : i + batch_size], dtype=torch.bool))
               for i in range(0, len(rows), batch_size)]
    return batches, order


def shuffled_order(count: int, seed: int, num_processes: int = 1) -> list[int]:
    """A seeded shuffle of range(count), less the last (count % num_processes) so every batch
    splits evenly over processes."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[: count - count % num_processes]


def even_order(count: int, batch_size: int, seed: int, num_processes: int, unit: str) -> list[int]:
    """`shuffled_order` after checking that dpo.batch_size splits over the processes; warns about
    the items (`unit`: "pairs" or "examples") left out so every batch splits evenly."""
    if batch_size % num_processes:
        raise ValueError(f"dpo.batch_size={batch_size} {unit} cannot be split evenly over {num_processes} "
                         f"processes; set dpo.batch_size to a multiple of {num_processes}")
    order = shuffled_order(count, seed, num_processes)
    if len(order) < count:
        log.warning("%d of %d %s left out of this update so they split evenly over %d processes",
                    count - len(order), count, unit, num_processes)
    return order


def make_batches(pairs: list[dict], prompt_ids: dict[str, list[int]], *, batch_size: int, max_length: int, pad_id: int,
                 seed: int, num_processes: int = 1) -> tuple[list[PairBatch], list[int]]:
    """Shuffle pairs with `seed` and cut them into batches of `batch_size` pairs; each response
    is cut so that prompt + response fits `max_length`.
    Returns (batches, order): order[i] is the index in `pairs` of the i-th batched pair.

    A pair's `chosen_prob` (0.5 for a kept tie) and `chosen_nll_weight` travel with it (either
    missing, as in records of earlier versions, means 1.0).
    With several processes every batch must split evenly: `batch_size` must be a
    multiple of `num_processes`, and the last (num_pairs % num_processes) shuffled pairs
    are left out of this round, so the last, smaller batch splits too."""
    order = even_order(len(pairs), batch_size, seed, num_processes, "pairs")
    encoded = [encode_pair(prompt_ids[pairs[i]["prompt_id"]], pairs[i]["chosen_token_ids"],
                           pairs[i]["rejected_token_ids"], max_length) for i in order]
    probs = [float(pairs[i].get("chosen_prob", 1.0)) for i in order]
    chosen_nll_weights = [float(pairs[i].get("chosen_nll_weight", 1.0)) for i in order]
    batches = [collate_pairs(encoded[i : i + batch_size], pad_id, probs[i : i + batch_size],
                             chosen_nll_weights[i : i + batch_size])
               for i in range(0, len(encoded), batch_size)]
    return batches, order
