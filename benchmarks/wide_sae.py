"""Wide SAEs on one machine (issue 15): peak memory and wall time per metric as the dictionary grows.

Random TopK dictionaries (`builtin:random-topk`, k=32) on the default model (SmolLM2-135M, d = 576) at
n = 16,384, 131,072 and 1,048,576 latents are evaluated with core, downstream and probes as `saebench run`
does (one process per SAE; downstream reuses core's encode, as in a run), on the default evaluation set and
a few probe tasks.  Each n runs in a fresh process; caches (residuals, the clean pass, task activations) are
warmed before anything is timed.  Per step it prints the wall time, the peak RSS during the step (Linux:
the high-water mark is reset through /proc/self/clear_refs before each step) and the RSS before it, then the
time of each step relative to the smallest n beside the ratio of n.  The encode's pre-activations are held
at most `saebench.sae.sae.SCRATCH_ELEMENTS` at a time and the probes densify at most
`saebench.metrics.probes.POOLED_ELEMENTS` pooled values at a time, so peak memory grows with the weights
(2 x n x d float32) and not with tokens x n or examples x n.

    python benchmarks/wide_sae.py [--sizes 16384,131072,1048576] [--n-tokens 16384]
                                  [--probe-tasks 5_hist_fig_ismale,6_hist_fig_isamerican]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_SIZES = "16384,131072,1048576"
DEFAULT_TASKS = "5_hist_fig_ismale,6_hist_fig_isamerican"
STEPS = ("build", "core", "downstream", "probes")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark measures memory on Linux only")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(step, device: str) -> tuple[object, dict]:
    """Run step(); its wall time, the peak RSS during it and the RSS before it (and the GPU's, on cuda)."""
    before = rss_mb("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak()
    t0 = time.perf_counter()
    out = step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    row = {"wall_s": time.perf_counter() - t0, "peak_mb": rss_mb("VmHWM"), "before_mb": before}
    if device.startswith("cuda"):
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out, row


def child(args) -> dict:
    """One n in this process: warm the caches, then build the SAE and run each metric, measured."""
    from saebench.context import EvalConfig
    from saebench.data.task_activations import site_task_activations
    from saebench.metrics.downstream import reference
    from saebench.metrics.probes import ProbesParams, selected
    from saebench.metrics.registry import get_metric
    from saebench.runner import Checkpoint, RunConfig, Runner

    torch.set_num_threads(args.threads)
    cfg = RunConfig(
        checkpoint="",
        metrics=list(STEPS[1:]),
        eval=EvalConfig(model=args.model, n_tokens=args.n_tokens, device=args.device),
        out=tempfile.mkdtemp(prefix="saebench-wide-"),
    )
    runner = Runner(cfg)
    context = runner.context_for(args.model, None)
    probe_params = ProbesParams(tasks=args.probe_tasks)
    tasks = selected(probe_params)
    _ = context.resid, reference(context)
    task_tokens = sum(int(site_task_activations(context.site, task).offsets[-1]) for task in tasks)

    rows = {}
    ckpt = Checkpoint(f"builtin:random-topk:n={args.n},k={args.k}", "wide")
    (sae, _), rows["build"] = measure(lambda: runner.load(ckpt), args.device)
    for name in STEPS[1:]:
        metric = get_metric(name)
        params = probe_params if name == "probes" else metric.params()
        result, rows[name] = measure(lambda m=metric, p=params: m.compute(context, sae, p), args.device)
        headline = metric.headline[0]
        rows[name][headline] = result.values[headline].value
    return {
        "n": args.n,
        "rows": rows,
        "tokens": int(context.mask.sum()),
        "tasks": len(tasks),
        "task_tokens": task_tokens,
        "weights_mb": 2 * sae.n_latents * sae.d_in * sae.W_enc.element_size() / 2**20,
        "threads": torch.get_num_threads(),
    }


def print_table(results: list[dict]) -> None:
    first = results[0]
    print(
        f"{first['tokens']} evaluation tokens; probes on {first['tasks']} tasks ({first['task_tokens']} "
        f"tokens); {first['threads']} torch threads"
    )
    gpu = any("gpu_peak_mb" in row for r in results for row in r["rows"].values())
    header = f"{'n':>9} {'step':<11} {'wall s':>8} {'peak RSS MB':>12} {'RSS before':>11}"
    print(header + (f" {'GPU peak MB':>12}" if gpu else "") + "  value")
    for r in results:
        for step in STEPS:
            row = r["rows"][step]
            value = next((f"{k} {v:.4g}" for k, v in row.items() if k not in _MEASURES), "")
            if step == "build":
                value = f"weights {r['weights_mb']:.0f} MB"
            gpu_col = f" {row.get('gpu_peak_mb', 0):12.0f}" if gpu else ""
            print(
                f"{r['n']:>9} {step:<11} {row['wall_s']:8.1f} {row['peak_mb']:12.0f} {row['before_mb']:11.0f}"
                f"{gpu_col}  {value}"
            )
    base = results[0]
    print(f"\ntime relative to n = {base['n']} (linear growth in n: the ratio equals n / {base['n']})")
    print(f"{'n':>9} {'n ratio':>8} " + " ".join(f"{s:>11}" for s in STEPS))
    for r in results:
        ratios = [r["rows"][s]["wall_s"] / base["rows"][s]["wall_s"] for s in STEPS]
        print(f"{r['n']:>9} {r['n'] / base['n']:8.1f} " + " ".join(f"{x:11.2f}" for x in ratios))


_MEASURES = {"wall_s", "peak_mb", "before_mb", "gpu_peak_mb"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="dictionary sizes, comma-separated")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-tokens", type=int, default=16384)
    p.add_argument("--probe-tasks", default=DEFAULT_TASKS, help="probe task names or tags, or all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)  # one size, in a child process
    args = p.parse_args()
    if args.n is not None:
        print(json.dumps(child(args)))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < args.k:
        sys.exit(f"--sizes {args.sizes!r}: give dictionary sizes of at least k={args.k}, comma-separated")
    results = []
    for n in sorted(sizes):
        cmd = [sys.executable, __file__, "--n", str(n), *_forwarded(args)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ, check=False)
        if done.returncode:
            sys.exit(f"n={n}: the measuring process failed (status {done.returncode}; its error is above)")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"n={n} done: " + ", ".join(f"{s} {results[-1]['rows'][s]['wall_s']:.1f} s" for s in STEPS))
    print()
    print_table(results)


def _forwarded(args) -> list[str]:
    return [
        *("--k", str(args.k), "--model", args.model, "--n-tokens", str(args.n_tokens)),
        *("--probe-tasks", args.probe_tasks, "--device", args.device, "--threads", str(args.threads)),
    ]


if __name__ == "__main__":
    main()
