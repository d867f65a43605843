"""The API judge against a local server that misbehaves on purpose.

Each fault ends as retries and then either the correct verdict or a counted error;
an error is never a win or a loss, and a position-biased judge never makes A win.
"""

import pytest

from judges import PairwiseItem, load_judge
from judges.base import JudgeLoadError
from judges.openai_judge import BudgetExceeded, MissingAPIKey
from tests.fake_openai_server import FakeOpenAI

ITEMS = [
    PairwiseItem("What is 2+2?", "RIGHT: 4", "wrong: 5"),
    PairwiseItem("What is 3+3?", "wrong: 7", "RIGHT: 6"),
]


def make_judge(server, tmp_path, **options):
    opts = dict(model="fake-judge", base_url=server.base_url, api_key_env="FAKE_JUDGE_KEY",
                cache_path=str(tmp_path / "cache.sqlite"), max_retries=3, timeout_s=5.0)
    opts.update(options)
    return load_judge("openai", **opts)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test-SECRET-123")


def test_correct_judge_both_orders_soft_preference_usage_and_cache(tmp_path):
    with FakeOpenAI("judge") as server:
        judge = make_judge(server, tmp_path, price_per_million_input=2.0, price_per_million_output=8.0)
        verdicts = judge.compare(ITEMS)
        assert [v.winner for v in verdicts] == ["a", "b"]
        assert len(server.requests) == 4  # two orders per pair
        assert judge.stats.consistent == 2 and judge.stats.consistency_rate == 1.0
        # soft preference from top log-probs: P(winner token) = e^-0.105 / (e^-0.105 + e^-2.303) ~ 0.9
        assert 0.85 < verdicts[0].prob_a < 0.95 and 0.05 < verdicts[1].prob_a < 0.15
        assert verdicts[0].usage.prompt_tokens == 200 and verdicts[0].usage.calls == 2
        assert judge.stats.cost == pytest.approx(4 * (100 * 2.0 + 1 * 8.0) / 1e6)
        # a second pass (a resumed round, or a new judge on the same cache) sends nothing
        again = make_judge(server, tmp_path).compare(ITEMS)
        assert [v.winner for v in again] == ["a", "b"]
        assert len(server.requests) == 4
        assert all(h == "Bearer sk-test-SECRET-123" for h in server.auth_headers)
    assert "SECRET" not in repr(judge)
    assert "SECRET" not in (tmp_path / "cache.sqlite").read_bytes().decode("latin-1")


def test_identical_requests_in_one_batch_are_paid_once(tmp_path):
    # Two candidates that wrote the same text give identical comparisons: one request each order.
    with FakeOpenAI("judge") as server:
        judge = make_judge(server, tmp_path, max_concurrency=4)
        verdicts = judge.compare([ITEMS[0], ITEMS[0], ITEMS[0], ITEMS[1]])
        assert [v.winner for v in verdicts] == ["a", "a", "a", "b"]
        assert len(server.requests) == 4 and len(server.answered) == 4
        assert judge.stats.requests == 4 and judge.stats.cache_hits == 4
        assert [v.usage.calls for v in verdicts] == [2, 0, 0, 2]  # each call's usage counted once


def test_position_biased_judge_never_makes_a_win(tmp_path):
    with FakeOpenAI("always_a") as server:
        judge = make_judge(server, tmp_path)
        assert [v.winner for v in judge.compare(ITEMS)] == ["tie", "tie"]
        assert judge.stats.consistency_rate == 0.0
        dropper = make_judge(server, tmp_path, on_disagreement="drop", cache_path=str(tmp_path / "c2.sqlite"))
        dropped = dropper.compare(ITEMS)
        assert all(v.winner is None and "position_inconsistent" in v.error for v in dropped)


def test_429_with_retry_after_is_honoured_then_succeeds(tmp_path):
    with FakeOpenAI("judge") as server:
        server.failures = [(429, {"Retry-After": "1"})]
        judge = make_judge(server, tmp_path, max_concurrency=1)
        assert [v.winner for v in judge.compare(ITEMS[:1])] == ["a"]
        assert len(server.requests) == 3  # the 429, its retry, and the second order
        assert server.requests[1]["t"] - server.requests[0]["t"] >= 0.9  # waited for Retry-After


def test_500s_are_retried(tmp_path):
    with FakeOpenAI("judge") as server:
        server.failures = [(500, {}), (503, {})]
        judge = make_judge(server, tmp_path, max_concurrency=1)
        assert [v.winner for v in judge.compare(ITEMS[:1])] == ["a"]
        assert len(server.requests) == 4


def test_persistent_500_ends_as_a_counted_error(tmp_path):
    with FakeOpenAI("judge") as server:
        server.failures = [(500, {})] * 10
        judge = make_judge(server, tmp_path, max_retries=1, max_concurrency=1)
        (v,) = judge.compare(ITEMS[:1])
        assert v.winner is None and "InternalServerError" in v.error
        assert judge.stats.errors["InternalServerError"] >= 1


def test_hang_past_timeout_is_an_error(tmp_path):
    with FakeOpenAI("hang") as server:
        server.hang_s = 3.0
        judge = make_judge(server, tmp_path, timeout_s=0.5, max_retries=1)
        (v,) = judge.compare(ITEMS[:1])
        assert v.winner is None and "Timeout" in v.error
        assert judge.stats.errors["APITimeoutError"] == 2  # both orders timed out


def test_malformed_json_and_unparseable_replies_are_errors(tmp_path):
    with FakeOpenAI("malformed") as server:
        judge = make_judge(server, tmp_path, max_retries=0)
        (v,) = judge.compare(ITEMS[:1])
        assert v.winner is None and v.error
    with FakeOpenAI("unparseable") as server:
        judge = make_judge(server, tmp_path, cache_path=str(tmp_path / "u.sqlite"))
        (v,) = judge.compare(ITEMS[:1])
        assert v.winner is None and "unparseable" in v.error
        assert judge.stats.errors["unparseable"] == 2


def test_budget_stops_cleanly_without_inventing_verdicts(tmp_path):
    with FakeOpenAI("judge") as server:
        judge = make_judge(server, tmp_path, max_calls=2, max_concurrency=1)
        with pytest.raises(BudgetExceeded, match="max_calls=2"):
            judge.compare(ITEMS)
        assert len(server.requests) == 2
        # the two paid replies were kept: resuming with a larger budget pays only for the rest
        resumed = make_judge(server, tmp_path, max_calls=10)
        assert [v.winner for v in resumed.compare(ITEMS)] == ["a", "b"]
        assert len(server.requests) == 4


def test_missing_api_key_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("FAKE_JUDGE_KEY")
    with pytest.raises(MissingAPIKey, match="FAKE_JUDGE_KEY"):
        load_judge("openai", model="m", api_key_env="FAKE_JUDGE_KEY", cache_path=str(tmp_path / "c.sqlite"))


def test_stats_since_a_snapshot_gives_one_rounds_share(tmp_path):
    import copy

    with FakeOpenAI("judge") as server:
        judge = make_judge(server, tmp_path)
        judge.compare(ITEMS[:1])
        snapshot = copy.deepcopy(judge.stats)
        judge.compare(ITEMS)  # ITEMS[0] now comes from the cache
        share = judge.stats.since(snapshot).as_dict()
    assert share["requests"] == 2 and share["cache_hits"] == 2 and share["consistent"] == 2
    assert judge.stats.requests == 4


def test_pointwise_rubric_scores_and_unparseable_ratings(tmp_path):
    from judges import PointwiseItem

    with FakeOpenAI("judge") as server:
        scorer = load_judge("openai_rubric", model="fake-judge", base_url=server.base_url, api_key_env="FAKE_JUDGE_KEY",
                            cache_path=str(tmp_path / "r.sqlite"))
        scores = scorer.score([PointwiseItem("2+2?", "RIGHT 4"), PointwiseItem("2+2?", "wrong 5")])
        assert [s.value for s in scores] == [8.0, 3.0] and len(server.requests) == 2
    with FakeOpenAI("unparseable") as server:
        scorer = load_judge("openai_rubric", model="fake-judge", base_url=server.base_url, api_key_env="FAKE_JUDGE_KEY",
                            cache_path=str(tmp_path / "r2.sqlite"))
        (s,) = scorer.score([PointwiseItem("2+2?", "4")])
        assert s.value is None and "unparseable" in s.error and scorer.stats.errors["unparseable"] == 1


def test_template_override_by_path_changes_the_cache_key(tmp_path):
    from judges.templates import load_template

    custom = tmp_path / "strict.txt"
    custom.write_text(load_template("pairwise").text.replace("Decide which", "Strictly decide which"))
    with FakeOpenAI("judge") as server:
        make_judge(server, tmp_path).compare(ITEMS[:1])
        judge = make_judge(server, tmp_path, template=str(custom))
        assert [v.winner for v in judge.compare(ITEMS[:1])] == ["a"]
        assert len(server.requests) == 4  # same pair, new template: not served from the cache
        assert "Strictly decide" in server.requests[-1]["body"]["messages"][0]["content"]
    broken = tmp_path / "broken.txt"
    broken.write_text("Which is better? {response_a}")
    with pytest.raises(ValueError, match="placeholders"):
        make_judge(FakeOpenAI("judge"), tmp_path, template=str(broken))
    # a JudgeError: the CLI prints it as one line (exit 2), naming the judge, its options and the file
    with pytest.raises(JudgeLoadError, match=r"judge 'openai' cannot be built .*FileNotFoundError: .*neither a built-in"):
        make_judge(FakeOpenAI("judge"), tmp_path, template=str(tmp_path / "missing.txt"))


def test_the_cache_answers_only_for_the_endpoint_and_model_that_gave_the_reply(tmp_path):
    """judge-eval against a truthful server, then a position-biased one under the same model name
    and cache: the second is asked (it once got no request). The same holds for another model
    served under the same name at the same address, as a vLLM server's listing shows it."""
    from judges.cache import request_key
    from judges.openai_judge import OpenAIClient

    with FakeOpenAI("judge") as truthful, FakeOpenAI("always_a") as biased:
        assert [v.winner for v in make_judge(truthful, tmp_path).compare(ITEMS)] == ["a", "b"]
        judge = make_judge(biased, tmp_path)
        assert [v.winner for v in judge.compare(ITEMS)] == ["tie", "tie"]  # "A" in both orders: inconsistent
        assert len(biased.requests) == 4 and judge.stats.cache_hits == 0

    with FakeOpenAI("judge") as server:
        server.models = [{"id": "fake-judge", "root": "/models/first"}]
        make_judge(server, tmp_path).compare(ITEMS[:1])
        make_judge(server, tmp_path).compare(ITEMS[:1])
        assert len(server.requests) == 2  # the same model behind the name: the second pass from the cache
        server.models = [{"id": "fake-judge", "root": "/models/second"}]
        make_judge(server, tmp_path).compare(ITEMS[:1])
        assert len(server.requests) == 4  # another model behind the same name: asked again

        # An entry cached before the endpoint was part of the key is never reused.
        client = OpenAIClient("fake-judge", base_url=server.base_url, api_key_env=None,
                              cache_path=str(tmp_path / "old.sqlite"))
        judge = make_judge(server, tmp_path, cache_path=str(tmp_path / "old.sqlite"))
        sha = next(iter(judge.protocol.templates().values()))
        for text in [r["body"]["messages"][0]["content"] for r in server.requests[:2]]:
            client.cache.put(request_key(model="fake-judge", template=sha, sampling=client.sampling, prompt=text),
                             {"text": "B", "prob_first": 0.0})  # the old key: model, template, sampling, prompt
        before = len(server.requests)
        assert [v.winner for v in judge.compare(ITEMS[:1])] == ["a"] and len(server.requests) == before + 2


def test_cache_off_asks_every_time_and_writes_nothing(tmp_path):
    from online_dpo.config import JudgeConfig, judge_options

    with FakeOpenAI("judge") as server:
        options = dict(model="fake-judge", base_url=server.base_url, api_key_env="FAKE_JUDGE_KEY",
                       cache_path=str(tmp_path / "off.sqlite"))
        off = judge_options(JudgeConfig(name="openai", options=options, cache="off"))
        assert off["cache"] is False
        for _ in range(2):
            judge = load_judge("openai", **off)
            assert [v.winner for v in judge.compare(ITEMS[:1])] == ["a"] and judge.stats.cache_hits == 0
        assert len(server.requests) == 4 and not (tmp_path / "off.sqlite").exists()
    # a judge without a reply cache has nothing to turn off: its options are left as they were
    assert judge_options(JudgeConfig(name="arithmetic", cache="off")) == {}
