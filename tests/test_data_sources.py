"""Prompt sources: local files (JSONL, JSON, CSV, Parquet), hf: names without a hub, the
train/eval split, duplicates, over-long prompts, reshuffled passes, and the load report.
Fast and without vLLM. Campaigns run from a Parquet file of chat prompts and from a JSONL of
plain prompts in tests/test_campaign_options.py."""

import json
import socket
import time

import pandas as pd
import pytest

from online_dpo.config import DataConfig
from online_dpo.data import (
    DataError,
    Prompt,
    PromptSplit,
    chat_prompt_ids,
    load_prompts,
    prompt_lengths,
)
from tests.conftest import run_python


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def questions(n, start=0):
    return [{"question": f"What is the capital of country number {i}?", "answer": f"city-{i}"}
            for i in range(start, start + n)]


def chat(i):
    return [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"Name a color, variant {i}."}]


# --- file formats -----------------------------------------------------------------------

def test_jsonl_plain_prompts_with_references(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", questions(20))
    cfg = DataConfig(source=src, prompt_column="question", reference_column="answer",
                     eval_fraction=0.25, eval_prompts=3, seed=5)
    split = load_prompts(cfg)
    assert len(split.eval) == 3 and len(split.train) == 17  # eval capped at eval_prompts, the rest trains
    everything = split.train + split.eval
    assert {p.text for p in everything} == {r["question"] for r in questions(20)}
    for p in everything:
        assert p.messages == [{"role": "user", "content": p.text}]
        n = p.text.split("number ")[1].rstrip("?")
        assert p.reference == f"city-{n}"
    assert {p.group for p in split.train}.isdisjoint({p.group for p in split.eval})
    again = load_prompts(cfg)
    assert [p.id for p in again.train] == [p.id for p in split.train]
    assert [p.id for p in again.eval] == [p.id for p in split.eval]
    rep = split.report.as_dict()
    assert rep["rows_read"] == 20 and rep["train"] == 17 and rep["eval"] == 3
    assert rep["duplicates_skipped"] == rep["too_long_skipped"] == rep["empty_skipped"] == 0
    assert "20 rows" in split.report.summary() and "17 train, 3 eval" in split.report.summary()


def test_prompt_ids_are_the_same_in_another_process(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", questions(8))
    cfg = DataConfig(source=src, prompt_column="question", eval_prompts=2)
    here = [p.id for p in load_prompts(cfg).train]
    code = ("import json; from online_dpo.config import DataConfig; from online_dpo.data import load_prompts; "
            f"print(json.dumps([p.id for p in load_prompts(DataConfig(source={src!r}, prompt_column='question', "
            "eval_prompts=2)).train]))")
    proc = run_python(["-c", code], timeout=120, env={"PYTHONHASHSEED": "123"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here


def test_parquet_of_chat_messages(tmp_path):
    path = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [chat(i) for i in range(6)], "extra": range(6)}).to_parquet(path)
    split = load_prompts(DataConfig(source=str(path), prompt_column="messages", eval_prompts=2, eval_fraction=0.3))
    assert len(split.eval) == 2 and len(split.train) == 4
    for p in split.train + split.eval:
        assert [m["role"] for m in p.messages] == ["system", "user"]
        assert p.messages[0]["content"] == "Answer in one word."
        assert p.text.startswith("system: Answer in one word.\nuser: Name a color, variant ")
        assert p.reference is None
    assert len({p.id for p in split.train + split.eval}) == 6


def test_csv_keeps_text_as_written_and_skips_blank_prompts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,answer\n"Say ""hi"", then stop.",007\nWhat is 6 times 7?,42\n,5\n'
                    "Name a prime.,2\nName an even number.,4\n")
    split = load_prompts(DataConfig(source=str(path), reference_column="answer", eval_prompts=1))
    by_text = {p.text: p.reference for p in split.train + split.eval}
    assert by_text == {'Say "hi", then stop.': "007", "What is 6 times 7?": "42",
                       "Name a prime.": "2", "Name an even number.": "4"}
    assert split.report.rows_read == 5 and split.report.empty_skipped == 1
    assert split.report.examples[0]["reason"] == "empty" and "row 3" in split.report.examples[0]["where"]


def test_json_array_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": f"Write a haiku about {w}."} for w in ["rain", "snow", "sun", "fog"]]))
    split = load_prompts(DataConfig(source=str(path), eval_prompts=1))
    assert sorted(p.text for p in split.train + split.eval) == sorted(
        f"Write a haiku about {w}." for w in ["rain", "snow", "sun", "fog"])


# --- eval source and disjointness --------------------------------------------------------

def test_eval_source_is_held_out_and_overlap_is_dropped_from_train(tmp_path):
    train_rows = questions(10)
    eval_rows = questions(3, start=20) + [
        {"question": "  WHAT is the capital of country number 4? ", "answer": "x"},  # same problem as train row 5
        {"question": train_rows[7]["question"], "answer": "y"},
    ]
    src, ev = write_jsonl(tmp_path / "train.jsonl", train_rows), write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    cfg = DataConfig(source=src, eval_source=ev, prompt_column="question", eval_prompts=4)
    split = load_prompts(cfg)
    assert len(split.eval) == 4 and all(p.text in {r["question"] for r in eval_rows} for p in split.eval)
    train_texts = {p.text for p in split.train}
    assert len(train_texts) == 8
    assert train_rows[4]["question"] not in train_texts and train_rows[7]["question"] not in train_texts
    assert split.report.eval_overlap_skipped == 2 and split.report.eval_rows_read == 5
    # the whole eval source is held out, not only the prompts kept for eval
    one = load_prompts(DataConfig(source=src, eval_source=ev, prompt_column="question", eval_prompts=1))
    assert len(one.eval) == 1 and {p.text for p in one.train} == train_texts
    with pytest.raises(DataError, match="also in data.eval_source"):
        load_prompts(DataConfig(source=src, eval_source=ev, prompt_column="question", on_duplicate="error"))


def test_split_asserts_train_and_eval_are_disjoint():
    p = Prompt("a1", [{"role": "user", "content": "hi"}], None, "g1")
    q = Prompt("b2", [{"role": "user", "content": "Hi "}], None, "g1")
    with pytest.raises(DataError, match="eval and train share 1 problems"):
        PromptSplit(train=[p], eval=[q])


# --- duplicates and length --------------------------------------------------------------

def test_duplicates_are_skipped_and_counted_or_rejected(tmp_path):
    rows = [{"prompt": "Tell me a joke."}, {"prompt": "Tell me a story."}, {"prompt": "tell me  a JOKE."},
            {"prompt": "Tell me a joke."}, {"prompt": "Tell me a riddle."}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    split = load_prompts(DataConfig(source=src, eval_prompts=1))
    texts = [p.text for p in split.train + split.eval]
    assert sorted(texts) == ["Tell me a joke.", "Tell me a riddle.", "Tell me a story."]
    assert split.report.duplicates_skipped == 2 and split.report.rows_read == 5
    assert [e["reason"] for e in split.report.examples] == ["duplicate of row 1", "duplicate of row 1"]
    with pytest.raises(DataError, match=r"row 3 repeats the prompt of row 1.*on_duplicate=skip"):
        load_prompts(DataConfig(source=src, on_duplicate="error"))


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from online_dpo.engines.models import load_tokenizer

    return load_tokenizer(embedded_model_path)


def test_too_long_prompts_are_skipped_or_rejected(tmp_path, tokenizer):
    rows = [{"prompt": f"Short question {i}?"} for i in range(6)] + [{"prompt": "word " * 300}]
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    short_len = len(chat_prompt_ids(tokenizer, [{"role": "user", "content": "Short question 0?"}]))
    limit = short_len + 5
    split = load_prompts(DataConfig(source=src, on_too_long="skip", eval_prompts=2), tokenizer, limit)
    kept = split.train + split.eval
    assert len(kept) == 6 and all("word word" not in p.text for p in kept)
    lengths = [len(chat_prompt_ids(tokenizer, p.messages)) for p in kept]
    assert prompt_lengths(kept, tokenizer) == lengths  # the batched count matches what generation feeds
    assert max(lengths) <= limit and split.report.longest_prompt_tokens == max(lengths)
    assert split.report.too_long_skipped == 1 and split.report.max_prompt_tokens == limit
    with pytest.raises(DataError, match=rf"over policy.max_prompt_tokens={limit}.*on_too_long=skip"):
        load_prompts(DataConfig(source=src, on_too_long="error"), tokenizer, limit)
    assert len(load_prompts(DataConfig(source=src, eval_prompts=2)).train) == 5  # no tokenizer: no length check


# --- errors a user can hit ---------------------------------------------------------------

def test_empty_file_and_file_without_prompts(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_prompts(DataConfig(source=str(tmp_path / "empty.jsonl")))
    src = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "  "}, {"prompt": None}])
    with pytest.raises(DataError, match="2 rows but no prompt in column 'prompt'"):
        load_prompts(DataConfig(source=src))


def test_missing_column_lists_the_available_ones(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", questions(4))
    with pytest.raises(DataError, match="no column 'prompt'; available columns: question, answer"):
        load_prompts(DataConfig(source=src))
    with pytest.raises(DataError, match="no column 'solution'; available columns: question, answer"):
        load_prompts(DataConfig(source=src, prompt_column="question", reference_column="solution"))


def test_unknown_extension_missing_file_and_unknown_name(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet"):
        load_prompts(DataConfig(source=str(tmp_path / "p.txt")))
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(DataConfig(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="unknown data.source 'gsm8k'.*hf:NAME"):
        load_prompts(DataConfig(source="gsm8k"))


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user"}], r"message 0 must be \{'role': str, 'content': str\}"),
    ([{"role": "narrator", "content": "x"}], "message 0 has role 'narrator'; roles are system, user, assistant"),
    ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "the chat messages must end with a user turn, not .assistant."),
])
def test_malformed_chat_messages(tmp_path, messages, match):
    src = write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user", "content": "fine"}]}, {"prompt": messages}])
    with pytest.raises(DataError, match=rf"row 2: {match}"):
        load_prompts(DataConfig(source=src))


def test_prompt_column_of_the_wrong_type(tmp_path):
    src = write_jsonl(tmp_path / "n.jsonl", [{"prompt": 3}, {"prompt": 4}])
    with pytest.raises(DataError, match="must hold text or a list of chat messages"):
        load_prompts(DataConfig(source=src))


# --- hf: sources without a hub ------------------------------------------------------------

def test_unreachable_hub_fails_fast_with_a_way_out(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"hub is unreachable.*local \.jsonl/\.csv/\.parquet file.*data\.source"):
        load_prompts(DataConfig(source="hf:openai/gsm8k", hf_config="main"))
    assert time.perf_counter() - t0 < 10


def test_hub_that_never_answers_times_out(monkeypatch):
    import huggingface_hub.constants

    from online_dpo.data import sources

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections, never replies
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(sources, "HUB_TIMEOUT_S", 0.5)
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError, match="hub is unreachable"):
            load_prompts(DataConfig(source="hf:some/dataset"))
    finally:
        server.close()
    assert time.perf_counter() - t0 < 10


def test_hub_name_on_this_machine_fails_fast():
    """The real default endpoint: no network here, so unreachable; with network, not found."""
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="Hugging Face hub"):
        load_prompts(DataConfig(source="hf:online-dpo-tests/no-such-dataset"))
    assert time.perf_counter() - t0 < 15


def test_offline_mode_reads_only_the_local_cache(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="local HF cache"):
        load_prompts(DataConfig(source="hf:online-dpo-tests/no-such-dataset"))


# --- rounds ---------------------------------------------------------------------------------

def test_reshuffle_passes_are_deterministic_and_never_repeat_within_a_pass(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", questions(13))
    cfg = DataConfig(source=src, prompt_column="question", eval_prompts=3, when_exhausted="reshuffle", seed=11)
    a, b = load_prompts(cfg), load_prompts(cfg)
    assert len(a.train) == 10  # 3 rounds of 3 per pass; 1 prompt left over each pass
    per_round, rounds = 3, 9
    # a resumed campaign asks for a later round first: same answer in any order
    later_first = {r: [p.id for p in b.round_prompts(r, per_round)] for r in reversed(range(rounds))}
    ids = {r: [p.id for p in a.round_prompts(r, per_round)] for r in range(rounds)}
    assert ids == later_first
    train_ids = {p.id for p in a.train}
    for first in range(0, rounds, 3):
        one_pass = ids[first] + ids[first + 1] + ids[first + 2]
        assert len(set(one_pass)) == 9 and set(one_pass) <= train_ids
    assert ids[0] + ids[1] + ids[2] == [p.id for p in a.train[:9]]  # pass 0 is the error-mode order
    assert ids[3] + ids[4] + ids[5] != ids[0] + ids[1] + ids[2]  # a new shuffle per pass
    assert ids[3] + ids[4] + ids[5] != ids[6] + ids[7] + ids[8]
    with pytest.raises(DataError, match="needs 11 train prompts but the source has 10"):
        a.round_prompts(0, 11)
    strict = load_prompts(DataConfig(source=src, prompt_column="question", eval_prompts=3, seed=11))
    assert [p.id for p in strict.round_prompts(2, 3)] == ids[2]
    with pytest.raises(DataError, match="when_exhausted=reshuffle"):
        strict.round_prompts(3, 3)


def test_builtin_task_keeps_working_with_the_report_and_reshuffle():
    split = load_prompts(DataConfig(train_prompts_per_round=100, eval_prompts=20, when_exhausted="reshuffle"))
    assert split.report.rows_read == len(split.train) + 20 and split.report.eval == 20
    far = split.round_prompts(50, 100)
    assert len({p.id for p in far}) == 100 and {p.id for p in far} <= {p.id for p in split.train}
