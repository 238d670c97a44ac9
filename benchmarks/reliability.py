"""Reliability under concurrency, kills and bad input: prints what survived and what differed.

    python benchmarks/reliability.py                      # the tiny model: a few minutes on two cores
    python benchmarks/reliability.py --model smollm2-135m # the real one (its GGUF package installed)

1. A single-process reference: every checkpoint evaluated (core, downstream, probes) by one process on a
   cold cache, and one uninterrupted `saebench train` run.
2. N processes (`--n`, default 3) on a cold cache, one checkpoint each: all must exit 0 with the reference's
   numbers.
3. Kills, at seeded random moments (`--seed`), each followed by a rerun that must give the reference's
   numbers, leave no corrupt file and not redo finished work:
   - in activation collection: a run SIGKILLed after its m-th cache shard (m random) while N - 1 others
     evaluate the other checkpoints on the same cold cache;
   - in result writing: a run killed after its m-th result file, or half-way through writing it; the
     result files finished before the kill must be reused by the rerun (their mtimes unchanged);
   - in training: `saebench train` killed after its m-th training-state write, or half-way through it;
     the rerun must resume (not restart) and end with the uninterrupted run's weights, and a third run
     must skip the finished run.
4. Every bad input of `tests/bad_inputs.py` (`CASES`, when that module exists): a non-zero exit, one line
   on stderr starting `saebench: error:`, no traceback and nothing under its --out.  They run in one
   worker process (`saebench.cli.main` per case, stderr captured) unless --bad-inputs-subprocess.

Kills are made by a prelude that wraps the write functions inside the victim process (the cache's shard
writes, results' atomic write, the trainer's state write) and SIGKILLs it at the chosen call, so a kill
lands in the phase it is meant for whatever the machine's speed.  At the end every .json under the work
folder must parse and every .npy, .safetensors and training state load.

Prints: runs, kills survived, bad inputs tried, tracebacks (must be 0), results that differ (must be 0),
and the other failures found (corrupt files, finished work recomputed, bad inputs mishandled); the exit
status is 1 when any of those is non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.data.test_concurrency import comparable, make_workspace  # noqa: E402

METRICS = ("core", "downstream", "probes")

PRELUDE = r"""
import io, os, signal, sys
import numpy as np

TARGET, KILL_AT, HOW = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = sys.argv[3:]
calls = 0


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counted(real, is_target=lambda *a: True, half=None):
    def wrapper(*args, **kwargs):
        global calls
        if not is_target(*args):
            return real(*args, **kwargs)
        calls += 1
        if calls == KILL_AT and HOW == "half":
            half(*args)
        out = real(*args, **kwargs)
        if calls == KILL_AT:
            die()
        return out
    return wrapper


if TARGET == "shards":
    from saebench.data import cache
    in_shards = lambda path, array: path.parent.name.startswith("shards-")  # noqa: E731
    cache.atomic_save_npy = counted(cache.atomic_save_npy, in_shards)
elif TARGET == "results":
    from saebench import results

    def half_result(path, data):  # half the bytes under the name the real write would use, then die
        from pathlib import Path
        tmp = Path(path).parent / f".{Path(path).name}.half.tmp"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data[: len(data) // 2])
        die()

    results.atomic_write_bytes = counted(results.atomic_write_bytes, half=half_result)
elif TARGET == "state":
    import torch
    from saebench.train import trainer

    def half_state(folder, state):
        from pathlib import Path
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(Path(folder) / f".training_state.pt.{os.getpid()}.tmp", "wb") as f:
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        die()

    trainer.write_state = counted(trainer.write_state, half=half_state)

from saebench.cli import main
sys.exit(main(sys.argv[1:]))
"""

BAD_INPUT_WORKER = r"""
import contextlib, io, json, sys, traceback
from saebench.cli import main

cases = json.loads(sys.stdin.read())
report = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    report.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(report))
"""


@dataclass
class Tally:
    runs: int = 0
    kills_tried: int = 0
    kills: int = 0
    bad_inputs: int = 0
    tracebacks: int = 0
    differ: int = 0
    corrupt: int = 0
    recomputed: int = 0
    mishandled: int = 0
    notes: list[str] = field(default_factory=list)

    def fail(self, counter: str, note: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        self.notes.append(note)
        print(f"  FAIL ({counter}): {note}", file=sys.stderr)


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work, self.tally = args, work, Tally()
        self.rng = random.Random(args.seed)
        self.ws = work / "workspace"

    # --- processes ----------------------------------------------------------------------------------------
    def start(self, argv: list[str], target: str = "none", kill_at: int = 0, how: str = "after"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env["TQDM_DISABLE"] = "1"
        cmd = [sys.executable, "-c", PRELUDE, target, str(kill_at), how, *argv]
        err = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        proc.err_file = err
        return proc

    def finish(self, procs, what: str, expect_kill: bool = False) -> list[int]:
        """Wait; count the runs, tracebacks and unexpected exits; returns the return codes."""
        codes = []
        for proc in procs:
            proc.wait(timeout=1800)
            proc.err_file.seek(0)
            err = proc.err_file.read()
            self.tally.runs += 1
            if "Traceback" in err:
                self.tally.fail("tracebacks", f"{what}: traceback\n{err[-2000:]}")
            if proc.returncode not in (0, -signal.SIGKILL) or (proc.returncode != 0 and not expect_kill):
                self.tally.fail("mishandled", f"{what}: exit {proc.returncode}: {err.strip()[-500:]}")
            codes.append(proc.returncode)
            proc.last_stderr = err
        return codes

    # --- evaluation -------------------------------------------------------------------------------------
    def run_argv(self, checkpoint: str, out: Path, cache: Path) -> list[str]:
        a = self.args
        ckpt = self.ws / "checkpoints" / checkpoint if checkpoint else self.ws / "checkpoints"
        return [
            "run",
            "--checkpoint",
            str(ckpt),
            "--tasks",
            ",".join(METRICS),
            "--probe-tasks",
            "tiny_halves",
            "--include-tasks",
            str(self.ws / "tasks"),
            *self.site_argv(),
            "--n-tokens",
            str(a.n_tokens),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
        ]

    def site_argv(self) -> list[str]:
        a = self.args
        model = str(self.ws / "model") if a.model == "tiny" else a.model
        return ["--model", model, "--layer", str(a.layer), "--corpus", str(self.ws / "corpus.txt")] + [
            "--ctx",
            str(a.ctx),
            "--batch-size",
            str(a.batch_size),
        ]

    def compare(self, out: Path, labels, what: str) -> None:
        for label in labels:
            for metric in METRICS:
                path, ref = out / label / f"{metric}.json", self.ref / label / f"{metric}.json"
                try:
                    same = comparable(json.loads(path.read_text())) == comparable(json.loads(ref.read_text()))
                except (OSError, ValueError) as e:
                    self.tally.fail("differ", f"{what}: {path}: {e}")
                    continue
                if not same:
                    self.tally.fail("differ", f"{what}: {label}/{metric} differs from the single-process run")

    def labels(self) -> list[str]:
        return [f"sae{i}" for i in range(self.args.n)]

    def reference(self) -> None:
        print("reference: one process, every checkpoint, cold cache", file=sys.stderr)
        self.ref = self.work / "reference" / "out"
        self.finish([self.start(self.run_argv("", self.ref, self.work / "reference" / "cache"))], "reference")
        if not all((self.ref / label / f"{m}.json").exists() for label in self.labels() for m in METRICS):
            raise SystemExit("reliability: the reference run failed; nothing to compare against")

    def concurrent(self) -> None:
        n = self.args.n
        print(f"concurrent: {n} processes on a cold cache", file=sys.stderr)
        out, cache = self.work / "concurrent" / "out", self.work / "concurrent" / "cache"
        procs = [self.start(self.run_argv(label, out, cache)) for label in self.labels()]
        self.finish(procs, "concurrent")
        self.compare(out, self.labels(), "concurrent")
        self.warm_cache = cache

    def kill_in_collection(self, round_: int) -> None:
        kill_at = self.rng.randint(1, self.args.max_shard)
        print(
            f"kill {round_}: collection, after shard {kill_at}, beside {self.args.n - 1} others",
            file=sys.stderr,
        )
        base = self.work / f"kill-collect-{round_}"
        out, cache = base / "out", base / "cache"
        labels = self.labels()
        victim = self.rng.choice(labels)
        killed = self.start(self.run_argv(victim, out, cache), "shards", kill_at)
        # the others start once the victim collects, so that the kill lands in its own collection
        deadline = time.monotonic() + 600
        while not list(cache.glob("*/*/shards-*/*.npy")) and killed.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        others = [self.start(self.run_argv(label, out, cache)) for label in labels if label != victim]
        (code,) = self.finish([killed], f"collection victim {victim}", True)
        self.tally.kills_tried += 1
        self.finish(others, "collection survivors")
        if code == -signal.SIGKILL:
            self.tally.kills += 1
        self.scan(base, "after a kill in collection")
        self.finish([self.start(self.run_argv(victim, out, cache))], "collection rerun")
        self.compare(out, labels, f"kill {round_} in collection")

    def kill_in_results(self, round_: int) -> None:
        kill_at, how = self.rng.randint(1, len(METRICS)), self.rng.choice(["after", "half"])
        print(f"kill {round_}: result writing, {how} result file {kill_at}", file=sys.stderr)
        out = self.work / f"kill-results-{round_}" / "out"
        label = self.rng.choice(self.labels())
        argv = self.run_argv(label, out, self.warm_cache)
        (code,) = self.finish([self.start(argv, "results", kill_at, how)], "results victim", True)
        self.tally.kills_tried += 1
        if code == -signal.SIGKILL:
            self.tally.kills += 1
        self.scan(out.parent, "after a kill in result writing")
        finished = {p: p.stat().st_mtime_ns for p in (out / label).glob("*.json")}
        if len(finished) != kill_at - (how == "half"):
            self.tally.fail("mishandled", f"results: {len(finished)} files after a kill at write {kill_at}")
        self.finish([self.start(argv)], "results rerun")
        for path, mtime in finished.items():
            if path.stat().st_mtime_ns != mtime:
                self.tally.fail("recomputed", f"{path} was written again by the rerun")
        self.compare(out, [label], f"kill {round_} in result writing")

    # --- training ---------------------------------------------------------------------------------------
    def train_argv(self, out: Path, cache: Path) -> list[str]:
        sets = ["batch_size=64", "checkpoint_every=4", "geometric_median_tokens=256", "log_every=2"]
        return [
            "train",
            "--preset",
            "topk-n2048-k16",
            *self.site_argv(),
            "--n-tokens",
            str(self.args.train_tokens),
            *[x for s in sets for x in ("--set", s)],
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
        ]

    def train_reference(self) -> None:
        print("reference: one uninterrupted training run", file=sys.stderr)
        self.train_ref = self.work / "train-reference" / "out"
        self.finish([self.start(self.train_argv(self.train_ref, self.warm_cache))], "train reference")

    def kill_in_training(self, round_: int) -> None:
        kill_at, how = self.rng.randint(1, self.args.max_state), self.rng.choice(["after", "half"])
        print(f"kill {round_}: training, {how} state write {kill_at}", file=sys.stderr)
        out = self.work / f"kill-train-{round_}" / "out"
        argv = self.train_argv(out, self.warm_cache)
        (code,) = self.finish([self.start(argv, "state", kill_at, how)], "training victim", True)
        self.tally.kills_tried += 1
        if code == -signal.SIGKILL:
            self.tally.kills += 1
        self.scan(out.parent, "after a kill in training")
        (resumed,) = [self.start(argv)]
        self.finish([resumed], "training rerun")
        if (
            code == -signal.SIGKILL
            and (kill_at > 1 or how == "after")
            and "resuming at" not in resumed.last_stderr
        ):
            self.tally.fail("recomputed", f"training killed at state write {kill_at} restarted from scratch")
        self.same_weights(out, f"kill {round_} in training")
        sae = out / "topk-n2048-k16" / "sae" / "sae.safetensors"
        mtime = sae.stat().st_mtime_ns if sae.exists() else None
        (again,) = [self.start(argv)]
        self.finish([again], "training re-rerun")
        if "complete, skipped" not in again.last_stderr or (sae.exists() and sae.stat().st_mtime_ns != mtime):
            self.tally.fail("recomputed", "a finished training run was not skipped")

    def same_weights(self, out: Path, what: str) -> None:
        from safetensors.numpy import load_file

        name = "topk-n2048-k16/sae"
        try:
            files = sorted(p.name for p in (self.train_ref / name).glob("*.safetensors"))
            for file in files:
                a, b = load_file(self.train_ref / name / file), load_file(out / name / file)
                if a.keys() != b.keys() or any((a[k] != b[k]).any() for k in a):
                    self.tally.fail("differ", f"{what}: weights differ from the uninterrupted run")
            if not files:
                self.tally.fail("differ", f"{what}: the reference run left no weights")
        except (OSError, ValueError) as e:
            self.tally.fail("differ", f"{what}: {e}")

    # --- files ------------------------------------------------------------------------------------------
    def scan(self, folder: Path, what: str) -> None:
        """Every result, array, checkpoint and state under `folder` must be whole."""
        import numpy as np
        import torch
        from safetensors.numpy import load_file

        for path in folder.rglob("*"):
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            try:
                if path.suffix == ".json":
                    json.loads(path.read_text())
                elif path.suffix == ".npy":
                    np.load(path, allow_pickle=False)
                elif path.suffix == ".safetensors":
                    load_file(path)
                elif path.suffix == ".pt":
                    torch.load(path, weights_only=True)
            except Exception as e:  # anything that does not load is corrupt
                self.tally.fail("corrupt", f"{what}: {path}: {type(e).__name__}: {e}")

    # --- bad input --------------------------------------------------------------------------------------
    def bad_inputs(self) -> None:
        try:
            from tests.bad_inputs import CASES, expand, prepare
        except ImportError:
            print("bad inputs: tests/bad_inputs.py not found, skipped", file=sys.stderr)
            return
        print(f"bad inputs: {len(CASES)} cases", file=sys.stderr)
        folder = self.work / "bad-inputs"
        paths = prepare(folder)
        argvs = [expand(argv, paths) for argv, _ in CASES]
        if self.args.bad_inputs_subprocess:
            reports = []
            for argv in argvs:
                proc = self.start(argv)
                proc.wait(timeout=600)
                proc.err_file.seek(0)
                reports.append({"code": proc.returncode, "stderr": proc.err_file.read()})
        else:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run(
                [sys.executable, "-c", BAD_INPUT_WORKER],
                input=json.dumps(argvs),
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**env, "TQDM_DISABLE": "1"},
            )
            reports = json.loads(done.stdout.strip().splitlines()[-1])
        for (argv, fragment), report in zip(CASES, reports, strict=True):
            self.tally.bad_inputs += 1
            err, what = report["stderr"], " ".join(argv)
            fragment = expand([fragment], paths)[0]
            if "Traceback" in err:
                self.tally.fail("tracebacks", f"bad input {what}: traceback")
            errors = [line for line in err.splitlines() if line.startswith("saebench: error:")]
            if report["code"] == 0 or len(errors) != 1 or fragment not in errors[0]:
                self.tally.fail(
                    "mishandled", f"bad input {what}: exit {report['code']}, stderr {err.strip()!r}"
                )
            if paths["out"].exists() and any(paths["out"].iterdir()):
                self.tally.fail("mishandled", f"bad input {what}: left output in {paths['out']}")
                shutil.rmtree(paths["out"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (default, written locally) or a model alias/folder")
    p.add_argument("--n", type=int, default=3, help="concurrent processes (default %(default)s)")
    p.add_argument("--kills", type=int, default=2, help="kills per phase (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="work folder (default a temporary one, removed at the end)")
    p.add_argument("--bad-inputs-subprocess", action="store_true", help="one process per bad input")
    args = p.parse_args()
    tiny = args.model == "tiny"
    args.layer = 1 if tiny else 15
    args.ctx, args.batch_size = (16, 2) if tiny else (64, 4)
    args.n_tokens = 90 if tiny else 2000
    args.train_tokens = 1500 if tiny else 20000
    args.max_shard = 35 if tiny else 60  # about the cache shards a cold run writes
    args.max_state = 5  # training-state writes of a run (every 4 steps of 64 tokens, and the last)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="saebench-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    t0 = time.perf_counter()
    if tiny:
        from saebench.model.tiny import tiny_model

        model = tiny_model("llama", seed=0)
    else:
        from saebench.model.loading import load_model

        model = load_model(args.model, device="cpu")
    bench.ws.mkdir(parents=True, exist_ok=True)
    make_workspace(bench.ws, model, n_checkpoints=args.n, save_model=tiny)
    del model

    bench.reference()
    bench.concurrent()
    for i in range(args.kills):
        bench.kill_in_collection(i)
    for i in range(args.kills):
        bench.kill_in_results(i)
    bench.train_reference()
    for i in range(args.kills):
        bench.kill_in_training(i)
    bench.bad_inputs()
    bench.scan(work, "at the end")
    leftovers = [p for p in work.rglob("*.tmp") if any(part.endswith("cache") for part in p.parts)]

    t = bench.tally
    print(f"\nreliability ({args.model}, N={args.n}, seed {args.seed}, {time.perf_counter() - t0:.0f} s)")
    print(f"runs:                  {t.runs}")
    print(f"kills survived:        {t.kills}   (of {t.kills_tried} tried; a victim whose work another")
    print("                             process did first is not killed, and counts only as a run)")
    print(f"bad inputs tried:      {t.bad_inputs}")
    print(f"tracebacks:            {t.tracebacks}   (must be 0)")
    print(f"results that differ:   {t.differ}   (must be 0)")
    print(f"corrupt files:         {t.corrupt}   (must be 0)")
    print(f"finished work redone:  {t.recomputed}   (must be 0)")
    print(f"mishandled:            {t.mishandled}   (must be 0: wrong exit, message or leftover output)")
    print(f"cache temporaries left: {len(leftovers)}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    bad = t.tracebacks + t.differ + t.corrupt + t.recomputed + t.mishandled
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
