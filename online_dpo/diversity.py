"""The diversity watch: is the policy still writing different things, or collapsing?

DPO-style updates can over-fit the preferences and collapse what the policy writes
(every sample the same answer, the same phrasing). Each round's evaluation draws K samples
for a fixed set of held-out prompts and measures, per prompt, across its K samples:

- distinct-n (Li et al. 2016): distinct word n-grams / all word n-grams, n = 1, 2;
- pairwise overlap: the mean, over pairs of samples, of the n-gram Jaccard similarity
  (averaged over n = 1..4), an embedding-free self-similarity (1.0 = identical samples);
- token entropy: the mean of -log p(token) over the sampled tokens, with p the policy's
  own next-token probability. Because the tokens are sampled from p, this is the
  Monte-Carlo estimate of the policy's mean per-token entropy along its own samples
  (unbiased at temperature 1 and top_p 1; at other settings the samples come from the
  tempered distribution and it is a cross-entropy).

Words are `\\w+` runs and single punctuation marks, lower-cased. All functions are pure.
"""

from __future__ import annotations

import math
import re
from itertools import combinations
from typing import Sequence

WORD = re.compile(r"\w+|[^\w\s]")
OVERLAP_MAX_N = 4
# The metrics where a higher value means more diverse, compared against the baseline by the warning.
HIGHER_IS_MORE_DIVERSE = ("distinct_1", "distinct_2", "token_entropy")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams across `texts` (one prompt's K samples): in (0, 1],
    None when the texts hold no n-gram at all."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def jaccard(a: set, b: set) -> float | None:
    union = a | b
    return len(a & b) / len(union) if union else None


def _ngram_sets(text: str, max_n: int) -> list[set]:
    return [set(ngrams(words(text), n)) for n in range(1, max_n + 1)]


def _similarity(gi: list[set], gj: list[set]) -> float:
    """Mean over n of the Jaccard similarity of two samples' n-gram sets (n where both have none skipped)."""
    per_n = [s for s in (jaccard(a, b) for a, b in zip(gi, gj)) if s is not None]
    return sum(per_n) / len(per_n) if per_n else 1.0  # two empty samples are identical


def pairwise_overlap(texts: Sequence[str], max_n: int = OVERLAP_MAX_N) -> float | None:
    """Mean over pairs (i < j) of the mean over n = 1..max_n of the Jaccard similarity of the
    two samples' n-gram sets (n where both have none is skipped): 1.0 = all samples identical,
    0.0 = no shared word. None with fewer than 2 samples."""
    grams = [_ngram_sets(t, max_n) for t in texts]
    sims = [_similarity(gi, gj) for gi, gj in combinations(grams, 2)]
    return sum(sims) / len(sims) if sims else None


def distance_to_others(texts: Sequence[str], max_n: int = OVERLAP_MAX_N) -> list[float]:
    """Per sample, its mean n-gram distance (1 - the similarity of `pairwise_overlap`) to the
    other samples: how much it differs from its siblings (DivPO's diversity of a candidate).
    Shape: [len(texts)]; 0.0 for a lone sample."""
    grams = [_ngram_sets(t, max_n) for t in texts]
    return [sum(1.0 - _similarity(gi, gj) for j, gj in enumerate(grams) if j != i) / max(len(grams) - 1, 1)
            for i, gi in enumerate(grams)]


def mean_token_entropy(logprobs: Sequence[Sequence[float]]) -> float | None:
    """Mean of -log p over every sampled token of every sample (token-weighted), in nats.
    `logprobs[i]`: the log-prob of each token of sample i under the policy. None without tokens."""
    flat = [lp for sample in logprobs for lp in sample if math.isfinite(lp)]
    return -sum(flat) / len(flat) if flat else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def diversity_metrics(samples: Sequence[Sequence[str]], logprobs: Sequence[Sequence[Sequence[float]]] | None = None) -> dict:
    """The round's diversity: each metric averaged over prompts (entropy over all tokens).

    Args: samples[p] = the K sample texts of prompt p; logprobs[p][k] = the per-token
    log-probs of sample k of prompt p (optional). Returns {distinct_1, distinct_2,
    pairwise_overlap, token_entropy, prompts, samples_per_prompt}; a metric is None where
    nothing could be measured."""
    return {
        "distinct_1": _mean(distinct_n(s, 1) for s in samples),
        "distinct_2": _mean(distinct_n(s, 2) for s in samples),
        "pairwise_overlap": _mean(pairwise_overlap(s) for s in samples),
        "token_entropy": mean_token_entropy([lp for per_prompt in logprobs for lp in per_prompt]) if logprobs else None,
        "prompts": len(samples),
        "samples_per_prompt": max((len(s) for s in samples), default=0),
    }


def collapse_warnings(current: dict, reference: dict, fraction: float, reference_name: str = "the baseline") -> list[str]:
    """A warning for each diversity measure that fell below `fraction` of `reference`'s.

    distinct-1/2 and token entropy are compared directly; the pairwise overlap through its
    complement (1 - overlap: how different the samples are from each other)."""
    pairs = [(k, current.get(k), reference.get(k)) for k in HIGHER_IS_MORE_DIVERSE]
    cur_overlap, ref_overlap = current.get("pairwise_overlap"), reference.get("pairwise_overlap")
    if cur_overlap is not None and ref_overlap is not None:
        pairs.append(("1 - pairwise_overlap", 1 - cur_overlap, 1 - ref_overlap))
    out = []
    for name, value, ref in pairs:
        if value is None or ref is None or ref <= 0:
            continue
        if value < fraction * ref:
            out.append(f"diversity collapsing: {name} {value:.3f} is {value / ref:.0%} of {reference_name}'s "
                       f"{ref:.3f} (warning below {fraction:.0%})")
    return out
