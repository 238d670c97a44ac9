"""Command line: saebench run | tasks | train | leaderboard."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from saebench.context import DTYPES, EvalConfig


def _add_eval_args(p: argparse.ArgumentParser, n_tokens: bool = True) -> None:
    d = EvalConfig()
    p.add_argument(
        "--model",
        default=None,
        help=f"subject model: offline alias (smollm2-135m, gemma3-270m), local folder or Hugging Face "
        f"id (default: the checkpoint's model, else {d.model})",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="site = residual after this block (default: the checkpoint's, else about 3/4 depth)",
    )
    p.add_argument(
        "--corpus",
        default=d.corpus,
        help="evaluation text: sae-probes-mix, a local txt/jsonl/parquet path or a hub data set id",
    )
    if n_tokens:
        p.add_argument(
            "--n-tokens", type=int, default=d.n_tokens, help="evaluation tokens (default %(default)s)"
        )
    p.add_argument("--ctx", type=int, default=d.ctx, help="window length incl. BOS (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per model pass")
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="model and SAE dtype")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--cache-dir", default=None, help="activation cache (default $SAEBENCH_CACHE or ~/.cache/saebench)"
    )


def _eval_config(args, n_tokens: int = EvalConfig.n_tokens) -> EvalConfig:
    """The evaluation (or, for `train`, activation) settings shared by the subcommands."""
    if n_tokens <= 0 or args.ctx < 4:
        raise ValueError("--n-tokens must be positive and --ctx at least 4")
    return EvalConfig(
        model=args.model or EvalConfig.model,
        layer=args.layer,
        corpus=args.corpus,
        n_tokens=n_tokens,
        ctx=args.ctx,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )


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

    metrics, task_selection = parse_metrics(args.tasks, tuple(args.include_tasks))
    params = _parse_params(args.param)
    probe_tasks = args.probe_tasks or task_selection
    if probe_tasks:
        params.setdefault("probes", {})["tasks"] = probe_tasks
    if args.include_tasks:
        params.setdefault("probes", {})["include_tasks"] = ",".join(args.include_tasks)
    config = RunConfig(
        checkpoint=args.checkpoint,
        metrics=metrics,
        eval=_eval_config(args, n_tokens=args.n_tokens),
        out=args.out,
        force=args.force,
        format=args.format,
        model_given=args.model is not None,
        params=params,
    )
    results = Runner(config).run()
    print(summary_table(results))
    print(f"\nresults: {Path(args.out).resolve()}")
    return 0


def _train_overrides(items: list[str]) -> dict:
    import dataclasses

    from saebench.train.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or name not in fields:
            raise ValueError(f"bad --set {item!r}; use FIELD=VALUE with FIELD one of: {', '.join(fields)}")
        default = getattr(TrainConfig(), name)
        if isinstance(default, bool):
            out[name] = value.lower() in ("1", "true", "yes")
        elif value.lower() == "none":
            out[name] = None
        elif default is None:
            out[name] = float(value) if any(c in value for c in ".e") else int(value)
        else:
            out[name] = type(default)(value)
    return out


def cmd_train(args) -> int:
    import dataclasses

    from saebench.context import EvalContext
    from saebench.train.presets import PRESETS, SWEEPS
    from saebench.train.runs import train_runs

    if (args.preset is None) == (args.sweep is None):
        raise ValueError(
            "give exactly one of --preset NAME or --sweep NAME "
            f"(presets: {', '.join(PRESETS)}; sweeps: {', '.join(SWEEPS)})"
        )
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}")
    if args.sweep is not None and args.sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {args.sweep!r}; sweeps: {', '.join(SWEEPS)}")
    eval_cfg = _eval_config(args, n_tokens=args.n_tokens)
    names = [args.preset] if args.preset else list(SWEEPS[args.sweep])
    overrides = {"device": args.device, **_train_overrides(args.set)}
    configs = {n: dataclasses.replace(PRESETS[n], **overrides) for n in names}
    done = train_runs(EvalContext(eval_cfg), configs, Path(args.out), args.n_tokens)
    print("\n".join(str(p) for p in done))
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
    run = sub.add_parser(
        "run",
        help="evaluate a checkpoint (or a folder of them)",
        description="Evaluate SAE checkpoints; one result JSON per (checkpoint, metric).",
    )
    run.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file/folder, folder of checkpoints, or builtin:pca-topk / builtin:random-topk",
    )
    run.add_argument(
        "--tasks", default="core,downstream", help=f"'all' or comma-separated metrics ({metrics_help})"
    )
    run.add_argument("--format", default=None, help="override checkpoint format detection")
    run.add_argument("--out", default="results", help="results folder (default %(default)s)")
    run.add_argument("--force", action="store_true", help="recompute even if a matching result exists")
    run.add_argument(
        "--probe-tasks",
        default=None,
        help="probe tasks for the probes metric: names and/or tags, comma-separated (default all)",
    )
    run.add_argument(
        "--include-tasks",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of task YAMLs (repeatable)",
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METRIC.NAME=VALUE",
        help="override a metric parameter (repeatable)",
    )
    _add_eval_args(run)
    run.set_defaults(func=cmd_run)

    train = sub.add_parser(
        "train",
        help="train reference SAEs (TopK recipe, ReLU+L1 baseline)",
        description="Train one preset or a sweep on the subject model's training split; "
        "finished runs are skipped and interrupted ones resume.",
    )
    train.add_argument("--preset", default=None, help="one preset, e.g. topk-n4096-k32")
    train.add_argument("--sweep", default=None, help="a named sweep of presets, e.g. baseline")
    train.add_argument(
        "--n-tokens", type=int, default=500_000, help="training tokens per run (default %(default)s)"
    )
    train.add_argument("--out", default="checkpoints", help="folder for the runs (default %(default)s)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainConfig field for every run, e.g. batch_size=1024",
    )
    _add_eval_args(train, n_tokens=False)
    train.set_defaults(func=cmd_train)

    tasks = sub.add_parser("tasks", help="probe tasks")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    tl = tasks_sub.add_parser("list", help="list available probe tasks with their sizes")
    tl.add_argument("--include-tasks", action="append", default=[], help="extra folder of task YAMLs")
    tl.add_argument("--select", default="all", help="names and/or tags, comma-separated")
    tl.set_defaults(func=cmd_tasks)

    lb = sub.add_parser("leaderboard", help="markdown table and plots from result files")
    lb.add_argument(
        "--results", action="append", default=None, help="results folder (repeatable; default results)"
    )
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
