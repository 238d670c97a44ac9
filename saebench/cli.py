"""Command line: saebench run | tasks | train | leaderboard | explain."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import os
import sys
import warnings
from pathlib import Path

from saebench.context import EvalConfig
from saebench.data.site import DTYPES, SiteConfig
from saebench.metrics.registry import metrics as all_metrics


class _Parser(argparse.ArgumentParser):
    """argparse with the suite's error form: one line, `saebench: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"saebench: error: {message} (see `{self.prog} --help`)\n")


def _integer(minimum: int):
    """An argparse type: an integer >= minimum, written as 1024, 1_000 or 1e6."""

    def read(text: str) -> int:
        word = text.strip().replace("_", "")
        try:
            number = float(word)
        except ValueError:
            number = math.nan
        value = int(number) if math.isfinite(number) and number.is_integer() else None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    read.__name__ = "integer"
    return read


def check_device(text: str) -> str:
    """`--device` checked before any work: a torch device this machine has; returns it as given."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: CUDA is not available on this machine (torch {torch.__version__}); "
                "use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            have = ", ".join(f"cuda:{i}" for i in range(count))
            raise ValueError(
                f"--device {text}: this machine has {count} CUDA device(s) ({have}); use one of those"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: saebench runs on cpu, cuda or mps")
    return text


def _check_folder(flag: str, path: str | None) -> None:
    """A folder option (--out, --cache-dir) may name a folder or nothing yet, never a file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")


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
        type=_integer(0),
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
            "--n-tokens", type=_integer(1), default=d.n_tokens, help="evaluation tokens (default %(default)s)"
        )
    p.add_argument(
        "--ctx", type=_integer(4), default=d.ctx, help="window length incl. BOS (default %(default)s)"
    )
    p.add_argument("--batch-size", type=_integer(1), default=d.batch_size, help="windows per model pass")
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="model and SAE dtype")
    p.add_argument("--seed", type=_integer(0), default=d.seed)
    p.add_argument(
        "--cache-dir", default=None, help="activation cache (default $SAEBENCH_CACHE or ~/.cache/saebench)"
    )


def _site_config(args) -> SiteConfig:
    """The site settings shared by `run` (its evaluation set adds --n-tokens) and `train`, checked before any
    model loads (the layer is checked against the model once it is loaded)."""
    check_device(args.device)
    _check_folder("--out", getattr(args, "out", None))
    _check_folder("--cache-dir", args.cache_dir)
    return SiteConfig(
        model=args.model or SiteConfig.model,
        layer=args.layer,
        corpus=args.corpus,
        ctx=args.ctx,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )


def _parse_params(items: list[str]) -> dict[str, dict]:
    """`--param METRIC.NAME=VALUE` items -> {metric: {name: value}}, each value read by the parameter's
    declared type and each metric's parameters validated, before any model is loaded."""
    from saebench.metrics.registry import get_metric, metric_names
    from saebench.params import build, split_assignment

    usage = "METRIC.NAME=VALUE, e.g. core.dense_threshold=0.05"
    raw: dict[str, dict[str, str]] = {}
    for item in items:
        key, value = split_assignment(item, "--param", usage)
        metric, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(f"bad --param {item!r}: use {usage}")
        if metric not in metric_names():
            known = ", ".join(metric_names())
            raise ValueError(f"bad --param {item!r}: no metric {metric!r}; metrics: {known}")
        raw.setdefault(metric, {})[name] = value
    out = {}
    for metric, values in raw.items():
        owner, prefix = f"metric {metric!r}", f"{metric}."
        params = build(get_metric(metric).params, values, flag="--param", prefix=prefix, owner=owner)
        out[metric] = {name: getattr(params, name) for name in values}
    return out


def cmd_run(args) -> int:
    from saebench import ranks
    from saebench.runner import RunConfig, Runner, check_label, parse_metrics
    from saebench.summary import summary_table

    if ranks.launched_ranks() > 1:  # under torchrun: this rank's device; the checkpoints are shared out
        from saebench.sharded import WAIT_FOR_RANKS, ShardedRunner

        args.device = ranks.init_from_environment(args.device, timeout=WAIT_FOR_RANKS)
    site = _site_config(args)
    if args.format is not None:
        from saebench.sae.formats import FORMATS

        if args.format not in FORMATS:
            raise ValueError(
                f"--format {args.format}: unknown checkpoint format; known formats: {', '.join(FORMATS)}"
            )
    if args.label is not None:
        check_label(args.label)
    params = _parse_params(args.param)
    options: dict[str, dict] = {}
    for metric in all_metrics():
        for option in metric.options:
            value = getattr(args, _dest(option))
            if value not in (None, []):
                options.setdefault(metric.name, {})[option.param] = (
                    ",".join(value) if option.repeatable else value
                )
    metrics, implied = parse_metrics(args.tasks, options)
    for name in options:
        if name not in metrics:
            flags = " and ".join(
                o.flag
                for o in next(m for m in all_metrics() if m.name == name).options
                if o.param in options[name]
            )
            raise ValueError(
                f"{flags} sets a parameter of {name}, which --tasks does not select; add {name} to --tasks"
            )
    for name in {*implied, *options}:  # explicit options win over what --tasks items imply
        params[name] = {**params.get(name, {}), **implied.get(name, {}), **options.get(name, {})}
    config = RunConfig(
        checkpoint=args.checkpoint,
        metrics=metrics,
        eval=EvalConfig(**dataclasses.asdict(site), n_tokens=args.n_tokens),
        out=args.out,
        force=args.force,
        format=args.format,
        model_given=args.model is not None,
        params=params,
        label=args.label,
    )
    runner = ShardedRunner(config) if ranks.world_size() > 1 else Runner(config)
    results = runner.run()  # under torchrun: rank 0 has every rank's results and failures
    if results:
        print(summary_table(results, wide=args.wide))
        print(f"\nresults: {Path(args.out).resolve()}")
    if runner.failures:
        for failure in runner.failures:
            print(f"saebench: error: {failure}", file=sys.stderr)
        total = len(runner.failures) + len({r["checkpoint"]["label"] for r in results})
        print(
            f"saebench: {len(runner.failures)} of {total} checkpoints failed (listed above)", file=sys.stderr
        )
        return 1
    return 0


def _train_overrides(items: list[str]) -> dict:
    """`--set FIELD=VALUE` items -> {field: value}, each read by the TrainConfig field's declared type; the
    preset they are applied to validates the result."""
    from saebench.params import parse_assignments
    from saebench.train.config import TrainConfig

    values = parse_assignments(TrainConfig, items, flag="--set", usage="FIELD=VALUE, e.g. batch_size=1024")
    for name, instead in (("device", "--device"), ("max_tokens", "--n-tokens")):
        if name in values:  # the command sets these itself; an override would be checked late or ignored
            raise ValueError(f"bad --set {name}={values[name]}: use {instead} instead")
    return values


def cmd_train(args) -> int:
    import dataclasses

    from saebench import ranks
    from saebench.data.site import Site
    from saebench.runner import check_layer
    from saebench.train.presets import LR_SWEEPS, PRESETS, SWEEPS
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
    args.device = ranks.init_from_environment(args.device)  # under torchrun: this rank's device
    site_cfg = _site_config(args)
    names = [args.preset] if args.preset else list(SWEEPS[args.sweep])
    if args.only:
        if args.sweep is None:
            raise ValueError("--only picks presets of a sweep: give it with --sweep NAME")
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in args.only)]
        if not names:
            raise ValueError(
                f"--only {' '.join(args.only)} matches no preset of sweep {args.sweep} "
                f"({', '.join(SWEEPS[args.sweep])})"
            )
    overrides = {"device": args.device, **_train_overrides(args.set)}
    lr_sweep = args.sweep in LR_SWEEPS
    if lr_sweep and {"lr", "n_latents", "k", "l1_target_l0"} & set(overrides):
        raise ValueError(
            f"--sweep {args.sweep} sets lr, n_latents, k and l1_target_l0 itself; drop those --set items"
        )
    if args.install_trend is not None and not lr_sweep:
        raise ValueError(f"--install-trend installs the fit of an lr sweep ({' or '.join(LR_SWEEPS)})")
    configs = {n: dataclasses.replace(PRESETS[n], **overrides) for n in names}
    site = Site(site_cfg)
    check_layer(site)
    done = train_runs(site, configs, Path(args.out), args.n_tokens)
    if not ranks.is_main():
        return 0
    print("\n".join(str(p) for p in done))
    if lr_sweep:
        from saebench.train.lr_sweep import finish_lr_sweep, install_trend

        fit = finish_lr_sweep(
            site, done, Path(args.out), sweep=args.sweep, n_tokens=args.n_tokens, eval_tokens=args.eval_tokens
        )
        if args.install_trend is not None:
            print(f"lr trend: {install_trend(fit, Path(args.install_trend))}")
    return 0


def cmd_tasks(args) -> int:
    from saebench.data.tasks import discover_tasks, select_tasks, tasks_table

    tasks = discover_tasks(args.include_tasks)
    print(tasks_table(select_tasks(tasks, args.select)))
    return 0


def cmd_leaderboard(args) -> int:
    from saebench.leaderboard import generate

    for folder in args.results:
        if not Path(folder).exists():
            raise ValueError(
                f"--results {folder} does not exist; give a folder of result files (`saebench run --out`)"
            )
        if not Path(folder).is_dir():
            raise ValueError(f"--results {folder} is a file; give a folder of result files")
    _check_folder("--out", args.out)
    path = generate([Path(p) for p in args.results], Path(args.out), sort=args.sort)
    print(path.read_text())
    print(f"leaderboard: {path.resolve()}")
    return 0


def _dest(option) -> str:
    return "metric_option_" + option.flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    from saebench import __version__
    from saebench.metrics.registry import get_metric, metric_names
    from saebench.params import describe_fields
    from saebench.train.config import TrainConfig
    from saebench.train.lr_trend import TREND_FILE

    parser = _Parser(prog="saebench", description="Evaluate sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"saebench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    metrics_help = "; ".join(f"{n}: {get_metric(n).description}" for n in metric_names())
    params_help = "\n".join(
        f"{n}: {get_metric(n).description}\n{describe_fields(get_metric(n).params, indent=2)}"
        for n in metric_names()
    )
    run = sub.add_parser(
        "run",
        help="evaluate a checkpoint (or a folder of them)",
        description="Evaluate SAE checkpoints; one result JSON per (checkpoint, metric).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"metric parameters (--param METRIC.NAME=VALUE, e.g. probes.l2=1e-2):\n{params_help}",
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
        "--label",
        default=None,
        metavar="NAME",
        help="file a single checkpoint's results under OUT/NAME (default: its folder or file name)",
    )
    run.add_argument(
        "--wide", action="store_true", help="summary with every headline value, however wide the table"
    )
    for metric in all_metrics():
        for option in metric.options:
            run.add_argument(
                option.flag,
                dest=_dest(option),
                action="append" if option.repeatable else "store",
                default=[] if option.repeatable else None,
                metavar=option.metavar,
                help=f"{metric.name}: {option.help}",
            )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="METRIC.NAME=VALUE",
        help="override a metric parameter (repeatable; the parameters are listed below)",
    )
    _add_eval_args(run)
    run.set_defaults(func=cmd_run)

    train = sub.add_parser(
        "train",
        help="train reference SAEs (TopK recipe, ReLU+L1 baseline)",
        description="Train one preset or a sweep on the subject model's training split; "
        "finished runs are skipped and interrupted ones resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="TrainConfig fields (--set FIELD=VALUE; the defaults are TrainConfig's, a preset may set "
        f"its own):\n{describe_fields(TrainConfig, indent=2)}",
    )
    train.add_argument("--preset", default=None, help="one preset, e.g. topk-n4096-k32")
    train.add_argument("--sweep", default=None, help="a named sweep of presets, e.g. baseline")
    train.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="PATTERN",
        help="with --sweep: only its presets whose name matches this glob (repeatable), e.g. '*-n2048-*'; "
        "an lr sweep then scores and fits just those",
    )
    train.add_argument(
        "--n-tokens", type=_integer(1), default=500_000, help="training tokens per run (default %(default)s)"
    )
    train.add_argument("--out", default="checkpoints", help="folder for the runs (default %(default)s)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainConfig field for every run, e.g. batch_size=1024 (repeatable; fields below)",
    )
    train.add_argument(
        "--eval-tokens",
        type=_integer(1),
        default=EvalConfig.n_tokens,
        help="--sweep lr / relu-lr: held-out tokens each run is scored on (default %(default)s)",
    )
    train.add_argument(
        "--install-trend",
        nargs="?",
        const=str(TREND_FILE),
        default=None,
        metavar="PATH",
        help=f"--sweep lr / relu-lr: file the fitted trend under its activation where presets read it "
        f"(default {TREND_FILE.name} in the package), so runs without an explicit lr use it",
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

    from saebench.explain import add_parser as add_explain

    add_explain(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from saebench.ranks import OutOfStep

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
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError, OSError, OutOfStep) as e:
        if os.environ.get("SAEBENCH_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"saebench: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
