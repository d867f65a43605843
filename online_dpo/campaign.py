"""What a campaign holds between rounds (`Campaign`, built once by `setup`), where it stands
(the last accepted round, its checkpoint), and the one resume rule every stage follows (`once`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from judges import as_judge, load_judge
from judges.base import PairwiseJudge, asks_orders_apart, check_reachable, is_remote
from judges.models import resolve_model_path
from judges.ranking import SecondOrder
from online_dpo import hardware
from online_dpo.config import CampaignConfig, ConfigError, judge_options
from online_dpo.data import load_prompts
from online_dpo.engines.generate import Generator, HFGenerator, VLLMGenerator
from online_dpo.engines.models import load_policy, load_tokenizer
from online_dpo.engines.ranks import EveryRank
from online_dpo.engines.server import ANOTHERS, AS_STARTED, Probe, ServerGenerator, policy_probe
from online_dpo.engines.transports import build_transport
from online_dpo.errors import servers_during
from online_dpo.objectives import Objective, build_objective
from online_dpo.report.view import finite
from online_dpo.separation import explain_separation_alpha
from online_dpo.rundir import RunDir, write_json
from online_dpo.seeds import stable_seed
from online_dpo.train import lora, optim
from online_dpo.train.logps import attend_in_float32

log = logging.getLogger("online_dpo")
T = TypeVar("T")


@contextmanager
def timed(stage: str, timings: dict):
    t0 = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - t0
    log.info("%-10s %.1fs", stage, timings[stage])


def once(run: RunDir, r: int | str, stage: str, compute: Callable[[], T], read_back: Callable[[], T]) -> T:
    """The resume rule: a stage whose marker is in the manifest is read back from the run
    directory; otherwise it is computed (`compute` saves its outputs, then marks the stage)."""
    return read_back() if run.is_done(r, stage) else compute()


@dataclass
class Campaign:
    """What the loop holds between rounds (built once by `setup`).

    Under several processes (`torch.distributed.run` / `accelerate launch`) only the main
    process judges, evaluates and writes the run directory; every process reads the round's
    pairs back from disk and takes part in the reference pass and the update. With an
    in-process backend (vllm, hf) every process has its own `generator` and generates its
    share of the round's candidates (`round_generator`, a collective); with servers only the
    main process has one. `judge` is None on the other processes, and so are both generators
    where they do not generate; evaluation runs on the main process's generator.
    """

    cfg: CampaignConfig
    run: RunDir
    accelerator: object
    tokenizer: object
    split: object
    judge: object | None
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: Generator | None
    reference_model: torch.nn.Module | None  # dpo.reference=initial without LoRA: the frozen round-0 model
    resolved: hardware.Resolution  # every hardware-dependent `auto`, as resolved for this machine
    model_path: str  # the initial model's folder
    objective: Objective  # what the round trains on: pairs, or KTO's labelled examples
    # The round's candidates: `generator`, or over every process's own (engines.ranks.EveryRank).
    round_generator: Generator | None = None
    overlap_judging: bool = False  # judge.overlap_generation resolved, the same on every process
    second_order: SecondOrder = "all"  # judge.second_order resolved for this judge (main process)
    guard: str = "off"  # guard.on_loss resolved for this launch (check_launch): off, retry or stop
    eval_judge: object | None = None  # eval.judge, or the training judge where unset (main process)

    @property
    def reference_source(self) -> str:
        """Where the reference log-probs come from: "forward" (a pass of the reference model),
        "generation" (the candidates' own token log-probs; see the dpo.reference_logps option) or "none"."""
        return self.resolved.reference_logps.value

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def barrier(self) -> None:
        """Wait for every process, then re-read the manifest the main process may have moved on."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            self.run.reload()


def setup(cfg: CampaignConfig, run: RunDir, judge: object | None = None) -> Campaign:
    """Everything the rounds share, built once. `judge`: a judge object (or scoring function)
    that replaces the one cfg.judge names (the Python API's judge=)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    resolved = hardware.resolve(cfg)
    accelerator = Accelerator(mixed_precision=resolved.mixed_precision.value, cpu=resolved.hardware.device == "cpu")
    main = accelerator.is_main_process
    if not main:
        log.setLevel(logging.WARNING)  # one copy of the progress log, from the main process
    for line in resolved.lines():
        log.info("%s", line)
    guard, every_rank = check_launch(cfg, accelerator)  # before any model loads
    if resolved.mixed_precision.value == "bf16" and not resolved.hardware.fast_bf16:
        log.warning("dpo.mixed_precision=bf16 on a machine without native bf16: the update is emulated and runs "
                    "far slower than float32 (dpo.mixed_precision=auto picks float32 here)")
    model_path = resolve_model_path(cfg.policy.model)
    tokenizer = load_tokenizer(model_path)
    # Over-long prompts (after the chat template) are skipped or rejected here, per data.on_too_long.
    split = load_prompts(cfg.data, tokenizer, cfg.policy.max_prompt_tokens)
    if main:
        write_json(run.data_json, split.report.as_dict())
        log.info("%s", split.report.summary())
    split.round_prompts(cfg.rounds - 1, cfg.data.train_prompts_per_round)  # fail now, not in round N
    if not main:
        judge = None  # only the main process judges
    elif judge is not None:
        judge = as_judge(judge, "judge=")
    else:
        judge = load_judge(cfg.judge.name, **judge_options(cfg.judge))
    eval_judge = judge if cfg.eval.judge is None or not main else load_judge(cfg.eval.judge.name,
                                                                               **judge_options(cfg.eval.judge))
    for each in {id(j): j for j in (judge, eval_judge) if j is not None}.values():
        check_reachable(each)  # an API judge's server down or misnamed: said now, before the models load

    last = last_checkpoint(run, cfg.rounds)
    if last:
        log.info("resuming from %s", last)
    policy = build_policy(cfg, model_path, last)
    bf16_on_cpu = resolved.mixed_precision.value == "bf16" and resolved.hardware.device == "cpu"
    if bf16_on_cpu:
        attend_in_float32(policy)
    if cfg.dpo.gradient_checkpointing:
        optim.enable_gradient_checkpointing(policy)
    optimizer = optim.build_optimizer(policy, cfg.dpo)
    optim.configure_deepspeed(accelerator, cfg.dpo)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if cfg.dpo.optimizer_state == "carry" and last:
        optim.load_optimizer_state(optimizer, last, accelerator)

    reference_model = None
    if cfg.dpo.reference == "initial" and not cfg.lora.enabled:
        # Held frozen beside the policy (one more copy of the weights). With LoRA the initial
        # model is the policy with its adapter switched off; with the default "refreshed"
        # the reference pass runs on the policy itself before it is updated.
        reference_model = load_policy(model_path).to(accelerator.device).eval().requires_grad_(False)
        if bf16_on_cpu:
            attend_in_float32(reference_model)

    c = Campaign(cfg, run, accelerator, tokenizer, split, judge, policy, optimizer, None, reference_model, resolved,
                 model_path, build_objective(cfg), guard=guard, eval_judge=eval_judge)
    log.info("reference log-probs: %s (dpo.reference_logps=%s)", c.reference_source, cfg.dpo.reference_logps)
    if main or every_rank:
        with servers_during("start"):
            c.generator = build_generator(c, initial=last is None, every_rank=every_rank)
        c.round_generator = EveryRank(c.generator, accelerator) if every_rank else c.generator
    if main:
        engine = {"vllm_kv_cache_bytes": getattr(c.generator, "kv_cache_bytes", None),
                  "vllm_kv_block_tokens": getattr(c.generator, "kv_block_tokens", None)}  # as the engine runs them
        run.record_resolution({**resolved.as_dict(), **engine})
    c.overlap_judging = broadcast_object_list([overlaps_judging(cfg, judge) if main else None])[0]
    if main:
        c.second_order, line = resolve_second_order(cfg, judge)
        if line:
            log.log(logging.INFO if c.second_order == "deciding" else logging.WARNING, "%s", line)
        if c.objective.tests_separation:  # KTO labels each response: the setting has nothing to act on
            line, alarming = explain_separation_alpha(cfg.pairs, isinstance(judge, PairwiseJudge),
                                                      cfg.generation.samples_per_prompt)
            log.log(logging.WARNING if alarming else logging.INFO, "%s", line)
    version = policy_version(last_accepted_round(run, cfg.rounds) if last else None)
    if last and cfg.generation.backend != "hf":
        weights = policy_weights(c)  # a collective under FSDP/ZeRO-3: every process calls it
        if c.generator is not None:
            c.generator.update_weights(weights, version)
    elif c.generator is not None:
        c.generator.version = version
    return c


# accelerate's distributed types whose processes each hold a shard of the optimizer state
SHARDED_OPTIMIZER = ("FSDP", "DEEPSPEED")


def check_launch(cfg: CampaignConfig, accelerator) -> tuple[str, bool]:
    """What the campaign's settings need from how it was launched (accelerate's distributed type
    and process count), checked once accelerate has read the launch and before any model loads.
    Returns guard.on_loss resolved (auto: off where the optimizer state is sharded, since a
    roll-back cannot restore it) and whether every process generates (generates_on_every_rank)."""
    kind, processes = accelerator.distributed_type.value, accelerator.num_processes
    sharded = kind in SHARDED_OPTIMIZER
    if processes > 1 and cfg.dpo.batch_size % processes:
        raise ConfigError(f"dpo.batch_size={cfg.dpo.batch_size} is split evenly over the {processes} training "
                          f"processes; set dpo.batch_size to a multiple of {processes}")
    if sharded and cfg.dpo.optimizer_state == "carry":
        raise ConfigError(f"dpo.optimizer_state=carry saves the whole optimizer state with each checkpoint, which a "
                          f"{kind} launch shards over its processes; set dpo.optimizer_state=fresh, or use DDP / one "
                          f"process")
    if sharded and cfg.guard.on_loss in ("retry", "stop"):
        raise ConfigError(f"guard.on_loss={cfg.guard.on_loss} rolls a rejected round back by loading the previous "
                          f"policy's full weights, which a {kind} launch (its optimizer state sharded) cannot take "
                          f"here; set guard.on_loss=off (auto is off here), or use DDP / one process")
    every_rank = generates_on_every_rank(cfg, accelerator)
    if sharded and cfg.guard.on_loss == "auto":
        log.info("guard.on_loss=auto: off under %s (a roll-back cannot restore a sharded optimizer state)", kind)
        return "off", every_rank
    return cfg.guard.resolved(cfg.eval.enabled and cfg.eval.compare_previous), every_rank


def generates_on_every_rank(cfg: CampaignConfig, accelerator) -> bool:
    """Whether every training process generates its share of the candidates with its own
    engine: an in-process backend under several processes. vLLM's in-process engine joins the
    launcher's process group as it starts, so it cannot run on the main process alone."""
    if cfg.generation.backend == "vllm_server" or accelerator.num_processes == 1:
        return False
    kind = accelerator.distributed_type.value
    if kind == "FSDP" or kind == "DEEPSPEED" and accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
        raise ConfigError(f"generation.backend={cfg.generation.backend} under several processes runs an engine in "
                          f"each and gives it the policy's full weights every round, which a sharded ({kind}) policy "
                          f"gathers on the main process only; generate on vLLM servers instead "
                          f"(generation.backend=vllm_server, README \"Scaling out\")")
    return True


def resolve_second_order(cfg: CampaignConfig, judge) -> tuple[SecondOrder, str | None]:
    """judge.second_order as this judge can take it, and the log's line on it where it is set."""
    if cfg.judge.second_order == "all":
        return "all", None
    if not isinstance(judge, PairwiseJudge) or not asks_orders_apart(judge):
        return "all", (f"judge.second_order=deciding: not applied (judge {getattr(judge, 'name', judge)} scores each "
                       f"response, asks one order only, or cannot ask its two orders apart)")
    return "deciding", ("judge.second_order=deciding: every game asked in one order, the second order only of the "
                        "games of each prompt's best and worst candidates, which make its pair")


def overlaps_judging(cfg: CampaignConfig, judge) -> bool:
    """judge.overlap_generation: auto = for judges that wait on a remote API (`judges.base.is_remote`)."""
    choice = cfg.judge.overlap_generation
    return is_remote(judge) if choice == "auto" else bool(choice)


def build_generator(c: Campaign, initial: bool, every_rank: bool = False) -> Generator:
    """The generator generation.backend names. `initial`: the policy is the initial model (a
    fresh campaign), which generation servers must already hold. `every_rank`: one engine in
    each training process (`generates_on_every_rank`)."""
    cfg, gen_cfg = c.cfg, c.cfg.generation
    if gen_cfg.backend == "hf":
        return HFGenerator(c.accelerator.unwrap_model(c.policy), c.tokenizer, gen_cfg.hf_batch_sequences)
    if gen_cfg.backend == "vllm_server":
        return connect_servers(c, initial)
    gen_cfg = dataclasses.replace(gen_cfg, dtype=c.resolved.generation_dtype.value,
                                  kv_cache_gb=c.resolved.kv_cache_gb.value,
                                  kv_block_tokens=c.resolved.kv_block_tokens.value or "auto")
    max_len = longest_sequence(cfg)
    # the largest single generate call: a round's candidates, the held-out eval, or the diversity samples
    max_sequences = max(cfg.data.train_prompts_per_round * gen_cfg.samples_per_prompt, cfg.data.eval_prompts,
                        cfg.eval.diversity_prompts * cfg.eval.diversity_samples)
    generator = VLLMGenerator(c.model_path, c.tokenizer, gen_cfg, max_model_len=max_len, seed=cfg.seed,
                              max_sequences=max_sequences, every_rank=every_rank)
    if generator.kv_cache_bytes:
        log.info("vLLM KV cache %.2f GiB in blocks of %d tokens (generation.kv_cache_gb=%s; the largest call holds %d "
                 "sequences of <= %d tokens)", generator.kv_cache_bytes / 2**30, generator.kv_block_tokens,
                 gen_cfg.kv_cache_gb, max_sequences, max_len)
    return generator


def longest_sequence(cfg: CampaignConfig) -> int:
    """The most tokens one generated sequence holds: the longest prompt and the longest response."""
    return cfg.policy.max_prompt_tokens + max(cfg.generation.max_new_tokens, cfg.eval.max_new_tokens)


def connect_servers(c: Campaign, initial: bool) -> ServerGenerator:
    """The vLLM servers of servers.urls, checked: each is up with the endpoints the loop needs and
    serves the policy's model (its log-probs of a fixed completion match the initial policy's,
    saved in the run directory at the first start). Every later push is checked the same way
    against the policy it pushed."""
    s = c.cfg.servers
    policy = c.accelerator.unwrap_model(c.policy)
    autocast = torch.bfloat16 if c.resolved.mixed_precision.value == "bf16" else None

    def probe() -> Probe:
        return policy_probe(policy, c.tokenizer, autocast)

    generator = ServerGenerator(s.urls, c.tokenizer, build_transport(s, c.run.pushed_weights),
                                probe_policy=probe, tolerance=s.probe_tolerance,
                                label_prefix=f"{c.cfg.name}@{c.run.manifest['created']}/", timeout_s=s.timeout_s,
                                max_concurrent=s.max_concurrent_requests, seed_requests=s.seed_requests,
                                api_key_env=s.api_key_env)
    generator.check(longest=longest_sequence(c.cfg))
    if initial or not c.run.server_probe.exists():
        write_json(c.run.server_probe, dataclasses.asdict(probe()))
    # A server holding none of this campaign's pushed weights holds either the model it was
    # started with, which must be the policy's initial model and takes its label unpushed, or
    # weights another campaign pushed, which are replaced (this label comes with the push).
    holds = {server: generator.holds(server) for server in generator.servers}
    started = [server for server in generator.servers if holds[server] == AS_STARTED]
    reused = [server for server in generator.servers if holds[server] == ANOTHERS]
    generator.check_policy(Probe(**json.loads(c.run.server_probe.read_text())), "the policy's initial model", started)
    generator.label("initial", started)
    if initial and len(started) < len(generator.servers):
        # Also a crash after a push but before its round was saved: the campaign goes on from
        # the initial model, so that is what every server must hold again. The push checks
        # each server's log-probs against the policy afterwards.
        if reused:
            log.info("generation server(s) %s hold another campaign's weights; loading the initial model",
                     ", ".join(server.url for server in reused))
        generator.update_weights(lora.merged_weights(policy), "initial")
    return generator


def policy_version(r: int | None) -> str:
    """The label of round r's policy on the generators (None: the initial model)."""
    return "initial" if r is None else f"round-{r}"


def build_policy(cfg: CampaignConfig, model_path: str, checkpoint: Path | None) -> torch.nn.Module:
    """The policy as saved in a round's `checkpoint` folder, or the initial model when None.
    With LoRA the checkpoint's adapter goes back on the initial weights (the checkpoint's
    model.safetensors holds the merged weights, for vLLM and for people), or a new adapter is
    made, seeded, so the same run starts from the same adapter."""
    policy = load_policy(str(checkpoint) if checkpoint and not cfg.lora.enabled else model_path)
    if cfg.lora.enabled:
        torch.manual_seed(stable_seed(cfg.seed, "lora-init"))
        policy = lora.wrap_lora(policy, cfg.lora, adapter_dir=checkpoint / lora.ADAPTER_DIR if checkpoint else None)
    return policy


def policy_weights(c: Campaign) -> list[tuple[str, torch.Tensor]] | None:
    """The policy's full weights under plain HF names (LoRA merged) on the main process and on
    every process with its own generator, None elsewhere.
    Every process must call it: gathering a sharded (FSDP/ZeRO-3) state dict is a collective."""
    full = c.accelerator.get_state_dict(c.policy)
    wanted = c.is_main or c.generator is not None  # an engine in every process: each needs them
    return lora.merged_weights(c.accelerator.unwrap_model(c.policy), full) if wanted else None


def guard_verdict(ev: dict, against_previous: bool) -> dict:
    """The round guard on one round's eval: accepted only when its win rate against the policy it
    started from (the previous accepted round's, or the initial one) has a 95% CI that reaches
    50%. A round without that win rate (its comparisons all judge errors) is not accepted: nothing
    says it did not lose."""
    key = "vs_previous" if against_previous else "vs_baseline"
    d = ev.get(key) or {}
    rate, low, high = (finite(d.get(k)) for k in ("win_rate", "ci_low", "ci_high"))
    against = "the previous accepted round" if against_previous else "the initial policy"
    if rate is None or high is None:
        reason = f"no win rate vs {against} to decide on ({d.get('errors', 0)} of {d.get('n', 0)} comparisons errors)"
        accepted_ = False
    else:
        accepted_ = high >= 0.5
        reason = (f"win rate vs {against} {100 * rate:.1f}% (95% CI {100 * low:.1f}%-{100 * high:.1f}%)"
                  + ("" if accepted_ else ": the whole interval is below 50%"))
    return {"accepted": accepted_, "against": key, "win_rate": rate, "ci_high": high, "reason": reason}


def accepted(run: RunDir, r: int) -> bool:
    """Whether round r's policy was kept: not rejected by the round guard (guard.on_loss)."""
    return run.manifest["rounds"].get(str(r), {}).get("eval", {}).get("accepted", True)


def last_accepted_round(run: RunDir, rounds: int) -> int | None:
    """The newest round whose update is saved and that the round guard did not reject: the
    policy the campaign continues from (None: the initial model)."""
    return next((r for r in reversed(range(rounds)) if run.is_done(r, "checkpoint") and accepted(run, r)), None)


def last_checkpoint(run: RunDir, rounds: int):
    r = last_accepted_round(run, rounds)
    if r is None:
        return None
    path = run.round_paths(r).checkpoint
    return path if (path / "config.json").exists() else None
