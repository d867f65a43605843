"""Judging while generating (judge.overlap_generation): each slice of a round's prompts is
judged in a background thread while the next slice generates. The fakes below prove the two
run at the same time: the generator will not finish the second slice until the judge holds
the first, and the judge will not finish the first until the second is generating. Judging
after generating, or slice by slice in turn, deadlocks, and the guard's timeout fails the
test (a deadlock guard, not a timing assertion)."""

import threading
import types

from judges.base import Score
from online_dpo import campaign
from online_dpo.config import CampaignConfig, to_dict
from online_dpo.data import Prompt
from online_dpo.engines.generate import Completion
from online_dpo.objectives import build_objective
from online_dpo.rundir import RunDir, read_parquet
from online_dpo.stages import generate as generate_stage
from online_dpo.stages import judge as judge_stage

GUARD_S = 120


class SliceGenerator:
    def __init__(self, events: dict[str, threading.Event]):
        self.calls: list[tuple[list[str], int]] = []
        self.events = events

    def generate(self, prompts, sampling):
        self.calls.append(([p.id for p in prompts], sampling.seed))
        if len(self.calls) == 2:
            self.events["second slice generating"].set()
            if not self.events["first slice judging"].wait(timeout=GUARD_S):
                raise AssertionError("the second slice generated without the first being judged meanwhile")
        return [[Completion(f"{p.id} answer " + "x" * k, [1] * (k + 1), "stop") for k in range(sampling.n)]
                for p in prompts]


class RemoteLengthScorer:
    """Scores a response by its length; `remote` makes the campaign overlap it (auto)."""

    name = "remote_length"
    remote = True

    def __init__(self, events: dict[str, threading.Event]):
        self.events = events
        self.items_seen: list[str] = []
        self.thread_names: set[str] = set()

    def score(self, items):
        self.thread_names.add(threading.current_thread().name)
        self.items_seen += [it.response for it in items]
        if not self.events["first slice judging"].is_set():
            self.events["first slice judging"].set()
            if not self.events["second slice generating"].wait(timeout=GUARD_S):
                raise AssertionError("the first slice was judged without the second generating meanwhile")
        return [Score(float(len(it.response))) for it in items]


def make_campaign(tmp_path, overlap="auto"):
    cfg = CampaignConfig()
    cfg.output_dir, cfg.name = str(tmp_path), "overlap"
    cfg.generation.samples_per_prompt = 3
    cfg.judge.overlap_generation, cfg.judge.overlap_chunks = overlap, 3
    run = RunDir.create(cfg.run_dir, to_dict(cfg), seeds={"campaign": cfg.seed})
    events = {"first slice judging": threading.Event(), "second slice generating": threading.Event()}
    judge, generator = RemoteLengthScorer(events), SliceGenerator(events)
    from online_dpo.hardware import Hardware, resolve

    resolved = resolve(cfg, Hardware("cpu", False, "AVX2", (), 2), environ={})  # stages read the reference source
    one_process = types.SimpleNamespace(is_main_process=True)
    c = campaign.Campaign(cfg, run, one_process, None, None, judge, None, None, generator, None, resolved, "unused",
                          build_objective(cfg), round_generator=generator,
                          overlap_judging=campaign.overlaps_judging(cfg, judge))
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(7)]
    return c, prompts, run


def test_a_remote_judge_scores_each_slice_while_the_next_generates(tmp_path):
    c, prompts, run = make_campaign(tmp_path)
    assert c.overlap_judging
    timings: dict = {}
    candidates, scores = generate_stage.stage_generate_while_judging(c, 0, prompts, timings)

    # 7 prompts in 3 slices (3, 3, 1), each with its own seed, in order
    assert [ids for ids, _ in c.generator.calls] == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6"]]
    assert len({seed for _, seed in c.generator.calls}) == 3
    assert c.judge.thread_names and all(n.startswith("judge") for n in c.judge.thread_names)
    # every candidate judged once, the scores in candidate order, and both stages on record as usual
    assert len(c.judge.items_seen) == 21 == len(set(c.judge.items_seen))
    assert scores == [[float(len(x.text)) for x in cs] for cs in candidates]
    assert run.is_done(0, "generate") and run.is_done(0, "judge")
    saved = read_parquet(run.round_dir(0) / "judgments.parquet")
    assert [(j["prompt_id"], j["index"], j["score"]) for j in saved] == [
        (x.prompt_id, x.index, float(len(x.text))) for cs in candidates for x in cs]
    assert set(timings) == {"generate", "judge"}

    # a resumed round (generation saved, judging not) reads the candidates back and judges them
    # in the foreground, without generating again
    run.manifest["rounds"]["0"].pop("judge")
    again_scores = judge_stage.stage_judge(c, 0, prompts, generate_stage.stage_generate(c, 0, prompts))
    assert again_scores == scores and len(c.generator.calls) == 3


def test_overlap_off_or_a_local_judge_keeps_the_stages_apart(tmp_path):
    c, _, _ = make_campaign(tmp_path, overlap=False)
    assert not campaign.overlaps_judging(c.cfg, c.judge)
    c.cfg.judge.overlap_generation = "auto"
    assert campaign.overlaps_judging(c.cfg, c.judge)
    c.judge.remote = False  # a local judge (a verifier, a local model) shares the machine: no overlap
    assert not campaign.overlaps_judging(c.cfg, c.judge)
