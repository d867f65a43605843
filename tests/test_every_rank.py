"""Every training process generates (an in-process backend under accelerate, TRL's colocate mode): a 2-round
campaign under two CPU processes, each with its own in-process vLLM engine. Afterwards each
process's share of each round's candidates is sampled again by a fresh engine in one
process, from the weights that round started from (round 1's: the round-0 checkpoint, pushed
into that engine as a campaign pushes its update) and with that process's seed. The tokens
are the same, so each share came from its own process's engine, the shares were gathered in
prompt order, and round 0's update reached both engines before round 1. The policy is the shallow
model (tests/conftest.py), its candidates ranked by length, so every round has pairs to train on."""

import json
import types

import pytest

from online_dpo.config import CampaignConfig, ConfigError
from online_dpo.engines.ranks import rank_share
from tests.conftest import BY_LENGTH, free_port, run_python

pytestmark = pytest.mark.vllm

OVERRIDES = [
    "rounds=2", "name=every-rank", "data.train_prompts_per_round=5", "data.eval_prompts=8",
    "generation.samples_per_prompt=4", "generation.max_new_tokens=12", "eval.max_new_tokens=12",
    "dpo.max_steps=2", "dpo.batch_size=2", "dpo.learning_rate=1e-4", "eval.diversity_prompts=0", "save_checkpoints=all",
    "guard.on_loss=off",  # round 1 must start from round 0's update, whatever its eval says
    # the float32 path on every machine, so one process replays each share token for token
    "dpo.mixed_precision=no", "generation.dtype=float32",
]

# Samples each process's share of a round's prompts again, in one process and a fresh engine,
# as every process of the campaign does: the campaign's engine settings (campaign.build_generator),
# the round's sampling, the process's seed (engines.ranks.rank_sampling). One engine replays
# every case (one start instead of three): round 0 and round 1 from the initial weights (round 1:
# what a policy the update never reached would sample), then round 1 from the round-0
# checkpoint, pushed into the engine as the campaign pushes its update.
REPLAY = """
import json, sys, types
from pathlib import Path
from online_dpo import hardware
from online_dpo.campaign import build_generator
from online_dpo.config import load_config
from online_dpo.data import Prompt
from online_dpo.engines.generate import Sampling
from online_dpo.engines.models import load_policy, load_tokenizer
from online_dpo.engines.ranks import rank_sampling, rank_share
from online_dpo.seeds import stable_seed
from online_dpo.train import lora

root, initial = Path(sys.argv[1]), sys.argv[2]
cfg = load_config(str(root / "config.yaml"))
tokenizer = load_tokenizer(initial)
c = types.SimpleNamespace(cfg=cfg, resolved=hardware.resolve(cfg), model_path=initial, tokenizer=tokenizer)
generator = build_generator(c, initial=True)
g = cfg.generation

def replay(r):
    prompts = [Prompt(**{k: row[k] for k in ("id", "messages")}) for row in map(json.loads,
               (root / f"round_{r:03d}" / "prompts.jsonl").read_text().splitlines())]
    sampling = Sampling(g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens,
                        stable_seed(cfg.seed, r, "train-generate"), logprobs=True)
    shares = []
    for rank in range(2):
        share = prompts[rank_share(len(prompts), rank, 2)]
        shares.append({p.id: [c.token_ids for c in cs]
                       for p, cs in zip(share, generator.generate(share, rank_sampling(sampling, rank)))})
    share = prompts[rank_share(len(prompts), 1, 2)]
    wrong_seed = {p.id: [c.token_ids for c in cs] for p, cs in zip(share, generator.generate(share, sampling))}
    return [shares, wrong_seed]

out = {"0": replay(0), "1 stale": replay(1)}
generator.update_weights(lora.merged_weights(load_policy(str(root / "round_000" / "checkpoint"))), "round-0")
out["1"] = replay(1)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_process_run(module_tmp, shallow_model_path):
    out = module_tmp / "runs"
    env = {"OMP_NUM_THREADS": "1"}  # two processes on two cores; the replay runs with the same kernels
    proc = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), "-m", "online_dpo.cli", "run", "configs/quickstart.yaml",
                       f"output_dir={out}", *OVERRIDES, f"policy.model={shallow_model_path}", *BY_LENGTH],
                      timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return out / "every-rank"


def candidates_by_prompt(root, r: int) -> dict[str, list[list[int]]]:
    from online_dpo.rundir import read_parquet

    rows = read_parquet(root / f"round_{r:03d}" / "candidates.parquet")
    by_prompt: dict[str, list[list[int]]] = {}
    for row in rows:
        assert row["index"] == len(by_prompt.setdefault(row["prompt_id"], [])), "candidates out of order"
        by_prompt[row["prompt_id"]].append(list(row["token_ids"]))
    return by_prompt


def test_each_process_generates_its_share_with_its_own_engine(two_process_run, shallow_model_path):
    root = two_process_run
    manifest = json.loads((root / "manifest.json").read_text())
    replay = run_python(["-c", REPLAY, str(root), shallow_model_path], timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert replay.returncode == 0, replay.stderr[-5000:]
    replayed = json.loads(replay.stdout.strip().splitlines()[-1])
    for r, version in ((0, "initial"), (1, "round-0")):
        assert manifest["rounds"][str(r)]["generate"]["policy_version"] == version
        saved = candidates_by_prompt(root, r)
        prompt_ids = [json.loads(line)["id"] for line in (root / f"round_{r:03d}" / "prompts.jsonl").read_text().splitlines()]
        assert list(saved) == prompt_ids and all(len(cs) == 4 for cs in saved.values())  # gathered in prompt order

        shares, wrong_seed = replayed[str(r)]
        assert [len(s) for s in shares] == [3, 2]  # 5 prompts over 2 processes
        for rank, share in enumerate(shares):
            assert {pid: saved[pid] for pid in share} == share, f"round {r}: process {rank}'s share differs"
        # process 1 has its own seed: its share sampled with process 0's differs (so the check above can fail)
        assert {pid: saved[pid] for pid in wrong_seed} != wrong_seed

    # and round 0's update mattered: the initial model samples other round-1 candidates
    stale, saved = replayed["1 stale"][0], candidates_by_prompt(root, 1)
    assert all({pid: saved[pid] for pid in share} != share for share in stale)


def test_judging_and_eval_stay_on_the_main_process(two_process_run):
    root = two_process_run
    for r in (0, 1):
        funnel = json.loads((root / f"round_{r:03d}" / "funnel.json").read_text())
        assert funnel["candidates"] == funnel["judged"] == 20
        ev = json.loads((root / f"round_{r:03d}" / "eval.json").read_text())["eval"]
        assert ev["vs_baseline"]["n"] == 8


def test_rank_shares_cover_every_prompt_once_in_order():
    for count in range(0, 12):
        for ranks in (1, 2, 3, 5):
            shares = [rank_share(count, rank, ranks) for rank in range(ranks)]
            assert [i for s in shares for i in range(count)[s]] == list(range(count))
            sizes = [len(range(count)[s]) for s in shares]
            assert max(sizes) - min(sizes) <= 1


def test_a_sharded_policy_cannot_feed_an_engine_in_every_process():
    from online_dpo.campaign import generates_on_every_rank

    cfg = CampaignConfig()
    fsdp = types.SimpleNamespace(num_processes=2, distributed_type=types.SimpleNamespace(value="FSDP"))
    with pytest.raises(ConfigError, match="generation.backend=vllm_server"):
        generates_on_every_rank(cfg, fsdp)
    cfg.generation.backend = "vllm_server"  # only the main process talks to the servers
    assert not generates_on_every_rank(cfg, fsdp)
    ddp = types.SimpleNamespace(num_processes=2, distributed_type=types.SimpleNamespace(value="MULTI_CPU"))
    assert generates_on_every_rank(CampaignConfig(), ddp)
    one = types.SimpleNamespace(num_processes=1, distributed_type=types.SimpleNamespace(value="NO"))
    assert not generates_on_every_rank(CampaignConfig(), one)
