"""Command line: saebench run | tasks | train | leaderboard."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from saebench.context import DTYPES, EvalConfig


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    p.add_argument("--model", default=None,
                   help=f"subject model: offline alias (smollm2-135m, gemma3-270m), local folder or Hugging Face "
                        f"id (default: the checkpoint's model, else {d.model})")
    p.add_argument("--layer", type=int, default=None,
                   help="site = residual after this block (default: the checkpoint's, else about 3/4 depth)")
    p.add_argument("--corpus", default=d.corpus,
                   help="evaluation text: sae-probes-mix, a local txt/jsonl/parquet path or a hub data set id")
    p.add_argument("--n-tokens", type=int, default=d.n_tokens, help="evaluation tokens (default %(default)s)")
    p.add_argument("--ctx", type=int, default=d.ctx, help="window length incl. BOS (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per model pass")
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="model and SAE dtype")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cache-dir", default=None, help="activation cache (default $SAEBENCH_CACHE or ~/.cache/saebench)")


def _eval_config(args) -> EvalConfig:
    if args.n_tokens <= 0 or args.ctx < 4:
        raise ValueError("--n-tokens must be positive and --ctx at least 4")
    return EvalConfig(model=args.model or EvalConfig.model, layer=args.layer, corpus=args.corpus,
                      n_tokens=args.n_tokens, ctx=args.ctx, batch_size=args.batch_size, device=args.device,
                      dtype=args.dtype, seed=args.seed, cache_dir=args.cache_dir)


def _parse_params(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        metric, dot, name = key.partition(".")
        if not eq or not dot:
            raise ValueError(f"bad --param {item!r}; use METRIC.NAME=VALUE, e.g. core.dense_threshold=0.05")
        out.setdefault(metric, {})[name] = value
    return out


def cmd_run(args) -> int:
    from saebench.runner import RunConfig, Runner, parse_metrics, summary_table

    config = RunConfig(checkpoint=args.checkpoint, metrics=parse_metrics(args.tasks), eval=_eval_config(args),
                       out=args.out, force=args.force, format=args.format, model_given=args.model is not None,
                       params=_parse_params(args.param))
    results = Runner(config).run()
    print(summary_table(results))
    print(f"\nresults: {Path(args.out).resolve()}")
    return 0


def cmd_tasks(args) -> int:
    from saebench.data.tasks import discover_tasks, select_tasks, tasks_table

    tasks = discover_tasks(args.include_tasks)
    print(tasks_table(select_tasks(tasks, args.select)))
    return 0


def cmd_leaderboard(args) -> int:
    from saebench.leaderboard import generate

    path = generate([Path(p) for p in args.results], Path(args.out), sort=args.sort)
    print(path.read_text())
    print(f"leaderboard: {path.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from saebench import __version__
    from saebench.metrics.registry import get_metric, metric_names

    parser = argparse.ArgumentParser(prog="saebench", description="Evaluate sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"saebench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    metrics_help = "; ".join(f"{n}: {get_metric(n).description}" for n in metric_names())
    run = sub.add_parser("run", help="evaluate a checkpoint (or a folder of them)",
                         description="Evaluate SAE checkpoints; one result JSON per (checkpoint, metric).")
    run.add_argument("--checkpoint", required=True,
                     help="checkpoint file/folder, folder of checkpoints, or builtin:pca-topk / builtin:random-topk")
    run.add_argument("--tasks", default="core,downstream",
                     help=f"'all' or comma-separated metrics ({metrics_help})")
    run.add_argument("--format", default=None, help="override checkpoint format detection")
    run.add_argument("--out", default="results", help="results folder (default %(default)s)")
    run.add_argument("--force", action="store_true", help="recompute even if a matching result exists")
    run.add_argument("--param", action="append", default=[], metavar="METRIC.NAME=VALUE",
                     help="override a metric parameter (repeatable)")
    _add_eval_args(run)
    run.set_defaults(func=cmd_run)

    tasks = sub.add_parser("tasks", help="probe tasks")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    tl = tasks_sub.add_parser("list", help="list available probe tasks with their sizes")
    tl.add_argument("--include-tasks", action="append", default=[], help="extra folder of task YAMLs")
    tl.add_argument("--select", default="all", help="names and/or tags, comma-separated")
    tl.set_defaults(func=cmd_tasks)

    lb = sub.add_parser("leaderboard", help="markdown table and plots from result files")
    lb.add_argument("--results", action="append", default=None, help="results folder (repeatable; default results)")
    lb.add_argument("--out", default="leaderboard", help="output folder (default %(default)s)")
    lb.add_argument("--sort", default=None, metavar="METRIC.VALUE", help="sort rows, e.g. core.nmse")
    lb.set_defaults(func=cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get("SAEBENCH_DEBUG"):
        warnings.filterwarnings("ignore", category=FutureWarning)
    if getattr(args, "results", "unset") is None:
        args.results = ["results"]
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("saebench: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError, OSError) as e:
        if os.environ.get("SAEBENCH_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"saebench: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
