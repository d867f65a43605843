"""Prompt sources (a built-in task, a local file, a hub dataset) read into a train/eval split.

A prompt is chat messages plus an optional reference answer (for verifiers). Sources:

- a built-in task: `arithmetic` (with reference answers) or `instructions` (open requests
  with checkable instructions, no references);
- a local file: .jsonl / .json / .csv / .parquet, read with `datasets`;
- a Hugging Face dataset, `hf:NAME` (+ `data.hf_config`, `data.split`). There may be no
  hub: it is probed with a short timeout first, so an unreachable hub fails in seconds.

The prompt column holds plain text or chat messages (a list of {role, content} ending
with a user turn). Rows are turned into prompts, empty ones skipped, duplicates (same
normalized text) skipped or rejected, and prompts over `policy.max_prompt_tokens` after
the chat template skipped or rejected; what was skipped is counted in a `SourceReport`.

Train prompts are handed out in fresh, non-overlapping slices per round; with
`data.when_exhausted: reshuffle` a new seeded pass starts when a round needs more than
remain. Round r's prompts are a pure function of (config, r), so a resumed campaign
sees the same prompts. The eval prompts are never trained on (asserted on `group`).
"""

from __future__ import annotations

import csv
import json
import random
import unicodedata
from contextlib import contextmanager
from pathlib import Path

from online_dpo.config import DataConfig
from online_dpo.data.prompts import Prompt, PromptSplit, SourceReport, prompt_lengths, stable_id
from online_dpo.data.tasks.arithmetic import arithmetic_split
from online_dpo.data.tasks.instructions import instructions_split
from online_dpo.errors import DataError

BUILTIN_TASKS = {"arithmetic": arithmetic_split, "instructions": instructions_split}


# --- file and hub sources ---------------------------------------------------------------

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_PREFIX = "hf:"
HUB_TIMEOUT_S = 5.0  # the hub probe; without it an unreachable hub costs ~25 s of retries
ROLES = ("system", "user", "assistant")


@contextmanager
def _quiet_datasets():
    """No "Generating train split" bars in the campaign log; restores the previous setting."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_file(source: str):
    """A local prompt file as a `datasets.Dataset` (one split)."""
    import datasets

    path = Path(source).expanduser()
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data source {source!r}: unsupported file type {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(FILE_BUILDERS)} or hf:NAME for a Hugging Face dataset")
    if not path.exists():
        raise DataError(f"data source file {source} does not exist (relative paths start at {Path.cwd()})")
    if not path.is_file():
        raise DataError(f"data source {source} is not a file; point it at a {'/'.join(FILE_BUILDERS)} file")
    if path.stat().st_size == 0:
        raise DataError(f"data source file {source} is empty; it needs one prompt per row")
    kwargs: dict = {}
    if builder == "csv":
        # Every column as text: "007" stays "007", and blank cells stay "" rather than NaN.
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False}
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pyarrow/pandas parse errors come in many types
        raise DataError(f"cannot read {source} as {builder}: {type(e).__name__}: {str(e)[:300]}") from None


def _read_hub(name: str, hf_config: str | None, split: str):
    """A Hugging Face hub dataset split. Fails fast, with a way out, where the hub is unreachable."""
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    offline = datasets.config.HF_HUB_OFFLINE  # HF_HUB_OFFLINE=1: only the local HF cache
    if not offline:
        try:
            HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
        except RepositoryNotFoundError:
            raise DataError(f"dataset {name!r} was not found on the Hugging Face hub (or it is private or "
                            f"gated: log in with `hf auth login` or set HF_TOKEN)") from None
        except HfHubHTTPError as e:
            raise DataError(f"the Hugging Face hub refused dataset {name!r}: {str(e)[:300]}") from None
        except Exception as e:  # DNS, refused connection, timeout: the hub is unreachable
            raise DataError(
                f"cannot load dataset hf:{name}: the Hugging Face hub is unreachable ({type(e).__name__}). "
                f"Save the dataset to a local .jsonl/.csv/.parquet file where the hub is reachable and set "
                f"data.source to its path, or set HF_HUB_OFFLINE=1 to use a copy in the local HF cache."
            ) from None
    try:
        with _quiet_datasets():
            return datasets.load_dataset(name, hf_config, split=split)
    except Exception as e:
        where = "the local HF cache (HF_HUB_OFFLINE is set)" if offline else "the hub"
        raise DataError(f"cannot load dataset hf:{name} (config {hf_config!r}, split {split!r}) from {where}: "
                        f"{type(e).__name__}: {str(e)[:300]}") from None


def _read_rows(source: str, hf_config: str | None, split: str):
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX):].strip()
        if not name:
            raise DataError("data source 'hf:' needs a dataset name, e.g. hf:openai/gsm8k")
        return _read_hub(name, hf_config, split)
    return _read_file(source)


def _looks_like_file(source: str) -> bool:
    return Path(source).suffix != "" or "/" in source or "\\" in source or Path(source).exists()


def _messages(value, where: str, column: str) -> list[dict] | None:
    """A prompt cell as chat messages; None for a blank cell. Raises on malformed messages."""
    if value is None:
        return None
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else None
    if not isinstance(value, list):
        raise DataError(f"{where}: column {column!r} must hold text or a list of chat messages "
                        f"({{role, content}}), got {type(value).__name__}: {str(value)[:80]}")
    if not value:
        return None
    messages = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} must be {{'role': str, 'content': str}}, got {str(m)[:80]}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})  # drops keys arrow filled with None
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the chat messages must end with a user turn, not {messages[-1]['role']!r}; "
                        f"drop the trailing answer (a reference answer goes in data.reference_column)")
    return messages


def _normalized_group(messages: list[dict]) -> str:
    """Hash of the normalized conversation: prompts differing only in case, Unicode form
    or whitespace are the same problem (duplicates, and train/eval disjointness)."""
    def norm(text: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", text).casefold().split())

    return stable_id(json.dumps([[m["role"], norm(m["content"])] for m in messages], ensure_ascii=False))


def _prompts_from_rows(ds, source: str, cfg: DataConfig, report: SourceReport) -> list[Prompt]:
    """Rows -> distinct prompts in file order, blank rows skipped, duplicates per data.on_duplicate."""
    columns = list(dict.fromkeys([cfg.prompt_column] + ([cfg.reference_column] if cfg.reference_column else [])))
    for col in columns:
        if col not in ds.column_names:
            raise DataError(f"{source} has no column {col!r}; available columns: {', '.join(ds.column_names)}. "
                            f"Set data.prompt_column / data.reference_column")
    prompts: list[Prompt] = []
    first_row_of: dict[str, int] = {}
    for i, row in enumerate(ds.select_columns(columns)):
        where = f"{source} row {i + 1}"
        messages = _messages(row[cfg.prompt_column], where, cfg.prompt_column)
        if messages is None:
            report.empty_skipped += 1
            report.skipped("empty", where)
            continue
        group = _normalized_group(messages)
        text = messages[-1]["content"]
        if group in first_row_of:
            if cfg.on_duplicate == "error":
                raise DataError(f"{where} repeats the prompt of row {first_row_of[group] + 1} ({text[:60]!r}); "
                                f"remove it or set data.on_duplicate=skip")
            report.duplicates_skipped += 1
            report.skipped(f"duplicate of row {first_row_of[group] + 1}", where, text)
            continue
        first_row_of[group] = i
        ref = row[cfg.reference_column] if cfg.reference_column else None
        reference = None if ref is None or (isinstance(ref, str) and not ref.strip()) else str(ref)
        pid = stable_id(json.dumps(messages, sort_keys=True, ensure_ascii=False))
        prompts.append(Prompt(pid, messages, reference, group))
    return prompts


def _drop_too_long(prompts: list[Prompt], tokenizer, max_tokens: int, cfg: DataConfig,
                   report: SourceReport) -> list[Prompt]:
    kept = []
    for p, n in zip(prompts, prompt_lengths(prompts, tokenizer)):
        if n > max_tokens:
            if cfg.on_too_long == "error":
                raise DataError(f"prompt {p.id} ({p.text[:60]!r}) is {n} tokens long after the chat template, "
                                f"over policy.max_prompt_tokens={max_tokens}; shorten it, raise the limit, or "
                                f"set data.on_too_long=skip")
            report.too_long_skipped += 1
            report.skipped(f"{n} tokens > {max_tokens}", f"prompt {p.id}", p.text)
            continue
        report.longest_prompt_tokens = max(report.longest_prompt_tokens or 0, n)
        kept.append(p)
    return kept


def _load_source(source: str, split: str, cfg: DataConfig, report: SourceReport) -> tuple[list[Prompt], int]:
    """Distinct prompts of a file or hub source, and its row count."""
    ds = _read_rows(source, cfg.hf_config, split)
    if len(ds) == 0:
        raise DataError(f"data source {source} has no rows")
    prompts = _prompts_from_rows(ds, source, cfg, report)
    if not prompts:
        raise DataError(f"data source {source} has {len(ds)} rows but no prompt in column {cfg.prompt_column!r}")
    return prompts, len(ds)


def load_prompts(cfg: DataConfig, tokenizer=None, max_prompt_tokens: int | None = None) -> PromptSplit:
    """The train/eval split of `cfg.source` (and `cfg.eval_source`), with its `SourceReport`.

    Given a tokenizer and `max_prompt_tokens`, prompts longer than that after the chat
    template are skipped or rejected (data.on_too_long), before the split, so the slices
    stay a function of the config alone.
    """
    report = SourceReport(source=cfg.source, eval_source=cfg.eval_source, max_prompt_tokens=max_prompt_tokens)
    check_length = tokenizer is not None and max_prompt_tokens is not None

    def filtered(prompts: list[Prompt]) -> list[Prompt]:
        return _drop_too_long(prompts, tokenizer, max_prompt_tokens, cfg, report) if check_length else prompts

    rng = random.Random(f"{cfg.seed}:split")
    if cfg.source in BUILTIN_TASKS:
        built = BUILTIN_TASKS[cfg.source](cfg)
        report.rows_read = len(built.train) + len(built.eval)
        train, eval_ = filtered(built.train), filtered(built.eval)
    elif cfg.source.startswith(HUB_PREFIX) or _looks_like_file(cfg.source):
        pool, report.rows_read = _load_source(cfg.source, cfg.split, cfg, report)
        pool = filtered(pool)
        rng.shuffle(pool)
        if cfg.eval_source:
            train, eval_ = pool, []
        else:  # a seeded share of the distinct prompts, capped; the rest is train
            n_eval = min(cfg.eval_prompts, max(1, round(len(pool) * cfg.eval_fraction)))
            eval_, train = pool[:n_eval], pool[n_eval:]
    else:
        raise DataError(f"unknown data.source {cfg.source!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}; "
                        f"or a file ({', '.join(FILE_BUILDERS)}), or hf:NAME for a Hugging Face dataset")

    if cfg.eval_source:
        eval_pool, report.eval_rows_read = _load_source(cfg.eval_source, cfg.eval_split, cfg, report)
        eval_pool = filtered(eval_pool)
        held_out = {p.group for p in eval_pool}  # all of it, not just the capped part: no train leaks
        overlapping = [p for p in train if p.group in held_out]
        if overlapping and cfg.on_duplicate == "error":
            raise DataError(f"{len(overlapping)} prompts of {cfg.source} are also in data.eval_source "
                            f"{cfg.eval_source}, e.g. {overlapping[0].text[:60]!r}; remove them or set "
                            f"data.on_duplicate=skip to drop them from training")
        for p in overlapping:
            report.skipped("in data.eval_source", f"prompt {p.id}", p.text)
        report.eval_overlap_skipped = len(overlapping)
        train = [p for p in train if p.group not in held_out]
        random.Random(f"{cfg.seed}:eval").shuffle(eval_pool)
        eval_ = eval_pool[: cfg.eval_prompts]

    report.train, report.eval = len(train), len(eval_)
    if not train:
        raise DataError(f"no train prompts left from {cfg.source} ({report.summary()}); use a larger source, "
                        f"or lower data.eval_fraction / data.eval_prompts")
    if not eval_:
        raise DataError(f"no eval prompts from {cfg.eval_source or cfg.source} ({report.summary()}); "
                        f"raise data.eval_prompts or data.eval_fraction")
    return PromptSplit(train, eval_, when_exhausted=cfg.when_exhausted, seed=cfg.seed, report=report)
