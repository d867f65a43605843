"""`online-dpo judge-eval`: how well does a judge agree with labelled pairs?

Input: JSONL rows {"prompt", "response_a", "response_b", "label": "a"|"b"|"tie"[, "reference"]}.
Agreement is measured over the verdicts that did not fail; errors are reported apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from judges import PairwiseItem, as_pairwise
from online_dpo.errors import LabelledPairsError

LABELS = {"a", "b", "tie"}


def read_labelled_pairs(path: str | Path) -> tuple[list[PairwiseItem], list[str]]:
    path = Path(path)
    if not path.is_file():
        raise LabelledPairsError(f"{path} does not exist")
    items, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = PairwiseItem(row["prompt"], row["response_a"], row["response_b"], row.get("reference"))
            label = str(row["label"]).lower()
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LabelledPairsError(
                f"{path}:{n}: each line must be JSON with prompt, response_a, response_b, label ({e})") from None
        if label not in LABELS:
            raise LabelledPairsError(f"{path}:{n}: label must be one of {sorted(LABELS)}, got {label!r}")
        items.append(item)
        labels.append(label)
    if not items:
        raise LabelledPairsError(f"{path} holds no labelled pairs")
    return items, labels


def evaluate_judge(judge, items: list[PairwiseItem], labels: list[str]) -> dict:
    verdicts = as_pairwise(judge).compare(items)
    answered = [(v.winner, label) for v, label in zip(verdicts, labels) if v.error is None]
    decisive = [(w, label) for w, label in answered if label != "tie"]
    errors = [v.error for v in verdicts if v.error is not None]
    stats = judge.stats.as_dict() if hasattr(judge, "stats") else {}
    return {
        "pairs": len(items),
        "agreement": sum(w == label for w, label in answered) / len(answered) if answered else math.nan,
        # on pairs whose label has a winner: how often the judge picked it (a tie counts half)
        "decisive_agreement": (sum(1.0 if w == label else 0.5 if w == "tie" else 0.0 for w, label in decisive)
                               / len(decisive)) if decisive else math.nan,
        "tie_rate": sum(w == "tie" for w, _ in answered) / len(items),
        "error_rate": len(errors) / len(items),
        "errors": sorted({e.split(":")[0] for e in errors}),
        "position_consistency": stats.get("position_consistency"),
        "requests": stats.get("requests"),
        "cache_hits": stats.get("cache_hits"),
        "cost": stats.get("cost", 0.0),
    }
