"""The judge-noise study: how much a campaign learns when its judge is wrong some of the time.

For each flip rate ε, each seed and each pair-selection setting, one quickstart campaign
(configs/quickstart.yaml: same prompts, steps and budget) is judged by the `noisy` judge: the
arithmetic verifier's verdicts flipped with probability ε where one response is right, and
the first-shown response preferred with probability `--position-bias` where both or neither
are, asked in both orders. Beside them, the verifier's own campaign per seed. Reported per
campaign: the final policy's held-out accuracy (against the reference answers, whatever the
judge) with its Wilson interval, its vs-initial win rate by the campaign's own judge, the
judge's requests and the pairs they made; per ε and seed, the new setting's accuracy minus
the old one's and the verifier's, each with a paired bootstrap interval over the 128
held-out prompts.

    python bench/noise_study.py --json runs/bench/noise_study.json            # the whole grid
    python bench/noise_study.py --eps 0.15 --seeds 0 --settings all deciding   # one cell

A campaign already finished under --out is read back, not run again, so an interrupted study
continues where it stopped. This is a study, not a test: it takes about 3 minutes a campaign
on a 2-core CPU with native bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from online_dpo.compare import paired_difference_interval  # noqa: E402
from online_dpo.evaluate import correctness, wilson_interval  # noqa: E402
from online_dpo.rundir import RunDir, read_jsonl  # noqa: E402

# The settings compared, the first one named being the baseline of the others. Every one asks
# both orders of every round-robin game but `deciding`, which asks the second order only of the
# games of each prompt's best and worst candidates. `auto` is the defaults, nothing pinned: the
# separation test chosen per round from the judge's measured flip rate. `all` is the earlier
# default, the test off: every prompt whose round robin ranks anything gives a pair, trained
# with the chosen-response NLL (`old` is the same, under the name of the first study).
# `no_nll`: a prompt the judge did not separate beyond chance (level 0.2, every round) keeps
# its pair without that NLL term. `new` and `alpha*` drop such prompts at that level (`new`:
# 0.2); `length` is `all` with the length-aware choice (the shortest of the candidates within
# 0.15 of the best share, the longest within 0.15 of the worst).
EVERY_GAME = "judge.second_order=all"
NO_TEST = "pairs.separation_alpha=1.0"


def dropping(level: float) -> list[str]:
    return [EVERY_GAME, f"pairs.separation_alpha={level:g}", "pairs.unseparated=drop"]


SETTINGS = {"auto": [EVERY_GAME], "all": [EVERY_GAME, NO_TEST], "deciding": ["judge.second_order=deciding", NO_TEST],
            "no_nll": [EVERY_GAME, "pairs.separation_alpha=0.2", "pairs.unseparated=no_nll"],
            "old": [EVERY_GAME, NO_TEST], "new": dropping(0.2),
            "alpha0.05": dropping(0.05), "alpha0.1": dropping(0.1), "alpha0.2": dropping(0.2),
            "length": [EVERY_GAME, NO_TEST, "pairs.length_aware=true", "pairs.length_tolerance=0.15"]}


def campaign(out: Path, name: str, seed: int, judge: list[str], extra: list[str]) -> Path:
    """Run (or read back) one quickstart campaign; returns its run directory."""
    run_dir = out / name
    if (run_dir / "summary.json").exists():
        return run_dir
    cmd = [sys.executable, "-m", "online_dpo.cli", "run", str(ROOT / "configs/quickstart.yaml"), f"name={name}",
           f"output_dir={out}", f"seed={seed}", *judge, *extra, "--overwrite"]
    print("running:", " ".join(cmd[3:]), flush=True)
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return run_dir


def results(run_dir: Path, greedy: bool = False) -> dict:
    """The final policy's accuracy, per-prompt correctness and vs-initial win rate; judge spend;
    with `greedy`, also its greedy accuracy (`greedy_correct`)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    accepted = [r for r in rounds if r.get("guard", {}).get("accepted", True)]
    final = accepted[-1] if accepted else None
    held_out = RunDir(run_dir).baseline if final is None else RunDir(run_dir).round_paths(final["round"])
    texts = read_jsonl(held_out.eval_responses)
    references = {c["prompt_id"]: c["reference"] for c in rounds[0]["eval"]["comparisons"]["vs_baseline"]}
    correct = correctness([_Ref(references[t["prompt_id"]]) for t in texts], [t["text"] for t in texts])
    n = len(correct)
    requests = sum((r.get("judge_stats") or {}).get("requests", 0) for r in rounds)
    pairs = sum(r.get("pairs", 0) for r in rounds)
    vs = (final or {}).get("eval", {}).get("vs_baseline", {})
    return {
        "final_round": None if final is None else final["round"],
        "accuracy_by_round": [r["eval"]["accuracy"] for r in rounds],
        "accuracy": sum(correct) / n, "accuracy_interval": list(wilson_interval(sum(correct), n)),
        "correct": correct,
        "win_vs_initial": vs.get("win_rate"), "win_interval": [vs.get("ci_low"), vs.get("ci_high")],
        "vs_previous": [r["eval"].get("vs_previous", {}).get("win_rate") for r in rounds],
        "pairs": pairs, "judge_requests": requests,
        "judge_quality": [r.get("judge_quality") and {k: r["judge_quality"].get(k) for k in
                          ("position_consistency", "separated_prompts", "tested_prompts", "separation_level")}
                          for r in rounds],
        "flip_rate_measured": [((r.get("judge_quality") or {}).get("vs_reference") or {}).get("flip_rate") for r in rounds],
        "pair_labels": pair_labels(RunDir(run_dir), [r["round"] for r in rounds]),
        "greedy_correct": greedy_correct(run_dir, final["round"]) if greedy and final is not None else None,
    }


def greedy_correct(run_dir: Path, round_: int) -> list[float]:
    """1.0 / 0.0 per held-out prompt: does the round's policy, decoding greedily (temperature 0,
    float32, HF generate), give the reference answer. Without the eval's sampling, two
    campaigns' paired difference holds only how their policies differ. Saved beside the run
    (greedy_eval.json) and read back."""
    import torch

    from online_dpo.config.loading import load_config
    from online_dpo.data.sources import load_prompts
    from online_dpo.engines.generate import HFGenerator, Sampling
    from online_dpo.engines.models import load_policy, load_tokenizer

    saved = run_dir / "greedy_eval.json"
    earlier = json.loads(saved.read_text()) if saved.exists() else None
    if earlier is not None and earlier["round"] == round_:
        return earlier["correct"]
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = str(RunDir(run_dir).round_paths(round_).checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    prompts = load_prompts(cfg.data, tokenizer, cfg.policy.max_prompt_tokens).eval
    generator = HFGenerator(load_policy(checkpoint), tokenizer)
    with torch.inference_mode():
        out = generator.generate(prompts, Sampling(n=1, temperature=0.0, top_p=1.0,
                                                   max_new_tokens=cfg.eval.max_new_tokens, seed=0))
    correct = correctness(prompts, [cs[0].text for cs in out])
    saved.write_text(json.dumps({"round": round_, "correct": correct}))
    return correct


def pair_labels(run: RunDir, rounds: list[int]) -> dict[str, int]:
    """What the campaign's pairs taught, checked against the reference answers: a right response
    over a wrong one, a wrong over a right (a flipped label), or two equally good responses (both
    right or both wrong: a pair the truth does not order)."""
    from datasets import load_from_disk

    kind = {(1, 0): "right_over_wrong", (0, 1): "wrong_over_right", (1, 1): "both_right", (0, 0): "both_wrong"}
    counts = dict.fromkeys(kind.values(), 0)
    for r in rounds:
        paths = run.round_paths(r)
        references = {p["id"]: p["reference"] for p in read_jsonl(paths.prompts)}
        pairs = load_from_disk(str(paths.pairs))
        refs = [_Ref(references[i]) for i in pairs["prompt_id"]]
        chosen = correctness(refs, [m[-1]["content"] for m in pairs["chosen"]])
        rejected = correctness(refs, [m[-1]["content"] for m in pairs["rejected"]])
        for c, w in zip(chosen, rejected):
            counts[kind[(int(c), int(w))]] += 1
    return counts


class _Ref:
    """What `correctness` reads of a prompt: its reference answer."""

    def __init__(self, reference: str):
        self.reference, self.text = reference, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    ap.add_argument("--position-bias", type=float, default=0.7)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--settings", nargs="+", default=["all", "auto"], choices=list(SETTINGS),
                    help="the first is the baseline: each other setting's accuracy is compared with its")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/noise_study")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--greedy", action="store_true",
                    help="also decode each final policy greedily on the held-out prompts (less noisy; ~30 s a campaign)")
    ap.add_argument("--judge-seeds", type=int, nargs="+", default=None,
                    help="the noisy judge's own seeds (default: the campaign's seed); more than one runs the same "
                         "campaign seed under other draws of the judge's noise")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, diffs = [], []
    for seed in args.seeds:
        verifier = results(campaign(args.out, f"verifier-s{seed}", seed, [], []), args.greedy)
        rows.append({"seed": seed, "judge": "verifier", "eps": None, "setting": "-", "judge_seed": None, **verifier})
        for eps in args.eps:
            for judge_seed in args.judge_seeds or [seed]:
                judge = ["judge.name=noisy", "judge.options.truth=arithmetic", f"judge.options.flip_rate={eps}",
                         f"judge.options.position_bias={args.position_bias}", f"judge.options.seed={judge_seed}"]
                draw = "" if judge_seed == seed else f"-j{judge_seed}"
                found = {}
                for setting in args.settings:
                    run_dir = campaign(args.out, f"noisy{eps:g}-{setting}-s{seed}{draw}", seed, judge, SETTINGS[setting])
                    found[setting] = results(run_dir, args.greedy)
                    rows.append({"seed": seed, "judge": "noisy", "eps": eps, "setting": setting,
                                 "judge_seed": judge_seed, **found[setting]})
                compared = [(f"{setting} - verifier", res, verifier) for setting, res in found.items()]
                baseline, *others = args.settings
                compared += [(f"{setting} - {baseline}", found[setting], found[baseline]) for setting in others]
                for what, a, b in compared:
                    for key, prefix in (("correct", ""), ("greedy_correct", "greedy: ")):
                        if a[key] is not None and b[key] is not None:
                            diffs.append(difference(seed, eps, prefix + what, a, b, key) | {"judge_seed": judge_seed})
    print_table(rows, diffs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"position_bias": args.position_bias, "runs": rows, "differences": diffs,
                                         "pooled": pooled(diffs)}, indent=1, default=float))


def difference(seed: int, eps: float, label: str, a: dict, b: dict, key: str = "correct") -> dict:
    """a's accuracy minus b's on the same held-out prompts (`key`: the sampled eval's per-prompt
    correctness, or the greedy one), with a paired bootstrap interval over the prompts."""
    low, high = paired_difference_interval(a[key], b[key], seed=seed)
    return {"seed": seed, "eps": eps, "what": label, "difference": float(np.mean(a[key]) - np.mean(b[key])),
            "interval": [low, high], "per_prompt": [x - y for x, y in zip(a[key], b[key])]}


# The 97.5% quantile of Student's t by degrees of freedom, for the interval over seeds.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


def seed_interval(per_seed: list[float]) -> list[float] | None:
    """A 95% t-interval for the mean of the per-seed differences: each seed is one campaign, so
    their spread holds the training's variation as well as the eval's. None for one seed."""
    n = len(per_seed)
    if n < 2:
        return None
    mean, sd = float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))
    half = T_975[max(df for df in T_975 if df <= n - 1)] * sd / np.sqrt(n)  # the nearest df below: a wider interval
    return [mean - half, mean + half]


def pooled(diffs: list[dict], n_boot: int = 4000) -> list[dict]:
    """Per (ε, comparison): the mean over seeds of the accuracy difference; a 95% bootstrap
    interval that resamples the held-out prompts within each seed (shape per seed: [prompts]),
    which covers the eval's sampling noise only; and a t-interval over the seeds
    (`seed_interval`), which covers the spread between campaigns too."""
    groups: dict[tuple, list[dict]] = {}
    for d in diffs:
        if d.get("judge_seed", d["seed"]) == d["seed"]:  # one draw of the judge's noise per campaign seed
            groups.setdefault((d["eps"], d["what"]), []).append(d)
    out = []
    rng = np.random.default_rng(0)
    for (eps, what), ds in groups.items():
        boot = np.zeros(n_boot)
        for d in ds:
            x = np.asarray(d["per_prompt"], dtype=float)
            boot += x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
        boot /= len(ds)
        out.append({"eps": eps, "what": what, "seeds": [d["seed"] for d in ds],
                    "mean": float(np.mean([d["difference"] for d in ds])),
                    "interval": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
                    "seed_interval": seed_interval([d["difference"] for d in ds]),
                    "per_seed": [d["difference"] for d in ds]})
    return out


def test_level(quality: dict | None) -> str:
    """The level a round's separation test acted at, as the table shows it ("-": no pairwise
    judge, or a run from before the level was recorded)."""
    level = (quality or {}).get("separation_level")
    return "-" if level is None else "off" if level >= 1.0 else f"{level:g}"


def print_table(rows: list[dict], diffs: list[dict]) -> None:
    print("\n| seed | judge | ε | setting | judge seed | accuracy by round | final accuracy (95% CI) | greedy accuracy "
          "| win vs initial (95% CI) "
          "| vs previous by round | pairs | right>wrong / wrong>right / both right / both wrong | judge requests "
          "| requests/pair | flip rate measured | separation test at |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["accuracy_interval"]
        win = "-" if r["win_vs_initial"] is None else f"{r['win_vs_initial']:.1%} ({r['win_interval'][0]:.1%}-{r['win_interval'][1]:.1%})"
        per_pair = f"{r['judge_requests'] / r['pairs']:.0f}" if r["pairs"] and r["judge_requests"] else "-"
        flips = ", ".join("-" if f is None else f"{f:.2f}" for f in r["flip_rate_measured"])
        levels = ", ".join(test_level(q) for q in r["judge_quality"])
        by_round = " → ".join(f"{a:.1%}" for a in r["accuracy_by_round"])
        vs_prev = ", ".join("-" if w is None else f"{w:.0%}" for w in r["vs_previous"])
        labels = " / ".join(str(n) for n in r["pair_labels"].values())
        greedy = "-" if r["greedy_correct"] is None else f"{np.mean(r['greedy_correct']):.1%}"
        print(f"| {r['seed']} | {r['judge']} | {'-' if r['eps'] is None else r['eps']} | {r['setting']} "
              f"| {r['judge_seed'] if r['judge_seed'] is not None else '-'} | {by_round} "
              f"| **{r['accuracy']:.1%}** ({lo:.1%}-{hi:.1%}) | {greedy} | {win} | {vs_prev} | {r['pairs']} | {labels} | {r['judge_requests'] or '-'} "
              f"| {per_pair} | {flips} | {levels} |")
    print("\n| seed | judge seed | ε | difference | accuracy points (paired bootstrap 95% CI) |")
    print("|---|---|---|---|---|")
    for d in diffs:
        print(f"| {d['seed']} | {d['judge_seed']} | {d['eps']} | {d['what']} | {100 * d['difference']:+.1f} "
              f"({100 * d['interval'][0]:+.1f} to {100 * d['interval'][1]:+.1f}) |")
    print("\n| ε | difference | seeds | mean accuracy points | 95% CI over seeds (t) | 95% CI, prompts resampled "
          "within seeds | per seed |")
    print("|---|---|---|---|---|---|---|")
    for p in pooled(diffs):
        over_seeds = "-" if p["seed_interval"] is None else \
            f"{100 * p['seed_interval'][0]:+.1f} to {100 * p['seed_interval'][1]:+.1f}"
        print(f"| {p['eps']} | {p['what']} | {', '.join(map(str, p['seeds']))} | **{100 * p['mean']:+.1f}** "
              f"| {over_seeds} | {100 * p['interval'][0]:+.1f} to {100 * p['interval'][1]:+.1f} | "
              f"{', '.join(f'{100 * x:+.1f}' for x in p['per_seed'])} |")


if __name__ == "__main__":
    main()
