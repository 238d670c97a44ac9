"""Bad command-line input: what `saebench` must refuse, one case per bad value of every option.

`CASES` is a list of `(argv, fragment)`: `saebench <argv>` must exit non-zero with exactly one line on
stderr, starting `saebench: error:` and containing `fragment`, no traceback, and nothing written under the
folder its `--out` names.  Every case fails fast: before any model loads, or on the tiny model (4 blocks,
d_model 64) in a local folder.

The argv strings hold placeholders for files a case needs; `prepare(folder)` makes them and returns the
mapping, `expand(argv, paths)` fills them in:

    {out}       a folder that does not exist yet: the case's --out (nothing may appear there)
    {model}     the tiny model, saved as a transformers folder
    {corpus}    a small text corpus (about 200 short documents)
    {ckpt}      a valid native checkpoint for the tiny model (d_in 64)
    {ckpts}     a folder of two valid checkpoints
    {narrow}    a valid checkpoint of the wrong width (d_in 32)
    {notckpt}   a file that is no checkpoint
    {file}      an existing plain file (for --out, --cache-dir and --results pointing at a file)
    {empty}     an empty folder
    {missing}   a path that does not exist
    {results}   a results folder holding one core result file
    {badtasks}  a folder with a task YAML that does not parse
    {cache}     the activation cache folder of the tiny cases

Used by tests/test_cli.py and by the benchmark that times how fast bad input is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: the tiny evaluation settings every `run` case starts from (a case's own options come after and win)
TINY = [
    "--model",
    "{model}",
    "--layer",
    "1",
    "--corpus",
    "{corpus}",
    "--n-tokens",
    "90",
    "--ctx",
    "16",
    "--batch-size",
    "4",
    "--cache-dir",
    "{cache}",
]
RUN = ["run", "--checkpoint", "{ckpt}", *TINY, "--out", "{out}"]
EXPLAIN = ["explain", "--checkpoint", "{ckpt}", *TINY, "--n-future", "4"]
TRAIN = ["train", "--preset", "topk-n2048-k16", "--model", "{model}", "--layer", "1", "--corpus", "{corpus}"]
TRAIN += ["--ctx", "16", "--n-tokens", "600", "--cache-dir", "{cache}", "--out", "{out}"]


def _device_cases() -> list[tuple[list[str], str]]:
    cases = [
        (["--device", "bogus"], "--device bogus: not a torch device; use cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:x"], "--device cuda:x: not a torch device"),
        (["--device", "cuda:99"], "--device cuda:99: "),
        (["--device", "meta"], "--device meta: saebench runs on cpu, cuda or mps"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available on this machine (torch "))
    if not torch.backends.mps.is_available():
        cases.append((["--device", "mps"], "--device mps: MPS is not available on this machine"))
    return cases


_RUN_OPTIONS: list[tuple[list[str], str]] = [
    *_device_cases(),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--layer", "9"], "--layer 9: the model has blocks 0..3"),
    (["--layer", "-1"], "argument --layer: expected an integer >= 0, got '-1'"),
    (["--layer", "two"], "argument --layer: expected an integer >= 0, got 'two'"),
    (["--n-tokens", "0"], "argument --n-tokens: expected an integer >= 1, got '0'"),
    (["--n-tokens", "-5"], "argument --n-tokens: expected an integer >= 1, got '-5'"),
    (["--n-tokens", "1.5"], "argument --n-tokens: expected an integer >= 1, got '1.5'"),
    (["--ctx", "2"], "argument --ctx: expected an integer >= 4, got '2'"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
    (["--checkpoint", "{missing}"], "missing: no such file or folder"),
    (["--checkpoint", "{notckpt}"], "unknown checkpoint format"),
    (["--checkpoint", "{empty}"], "no checkpoint found here or below"),
    (["--checkpoint", "{narrow}"], "does not match the model's residual width 64"),
    (["--checkpoint", "builtin:kmeans"], "unknown built-in baseline 'kmeans'"),
    (["--format", "bogus"], "--format bogus: unknown checkpoint format; known formats: "),
    (["--param", "core.dense_threshold=abc"], "bad --param 'core.dense_threshold=abc': expected a float"),
    (["--param", "bogus.x=1"], "bad --param 'bogus.x=1': no metric 'bogus'"),
    (["--param", "dense_threshold=0.5"], "bad --param 'dense_threshold=0.5': use METRIC.NAME=VALUE"),
    (["--param", "core.nonsense=1"], "metric 'core' has no parameter 'nonsense'"),
    (["--param", "core.dense_threshold=2"], "core: dense_threshold is a fraction in (0, 1], got 2.0"),
    (["--tasks", ""], "--tasks is empty"),
    (["--tasks", ","], "--tasks is empty"),
    (["--tasks", "core,bogus"], "--tasks: not a metric (core, downstream"),
    (["--tasks", "probes", "--include-tasks", "{missing}"], "does not exist; check the --include path"),
    (["--tasks", "probes", "--probe-tasks", "nope"], "no task or tag named 'nope'"),
    (["--tasks", "core", "--probe-tasks", "code"], "--probe-tasks sets a parameter of probes, which --tasks"),
    (["--out", "{file}"], "--out {file} is a file; give a folder"),
    (["--cache-dir", "{file}"], "--cache-dir {file} is a file; give a folder"),
    (["--model", "{missing}"], "does not exist; give an alias"),
    (["--corpus", "{missing}.txt"], "not found"),
    (["--label", "a/b"], "--label 'a/b': use letters, digits and . _ + - (not starting with .)"),
    (["--label", ""], "--label '': use letters, digits"),
    (["--label", "x", "--checkpoint", "{ckpts}"], "--label names one checkpoint, but {ckpts} holds 2"),
]

CASES: list[tuple[list[str], str]] = [
    ([], "the following arguments are required: command"),
    (["bogus"], "argument command: invalid choice: 'bogus'"),
    (["run"], "the following arguments are required: --checkpoint"),
    (["run", "--checkpoint", "{ckpt}", "--nonsense"], "unrecognized arguments: --nonsense"),
    *(([*RUN, *extra], fragment) for extra, fragment in _RUN_OPTIONS),
    (["train", "--preset", "nope", "--out", "{out}"], "unknown preset 'nope'; presets: "),
    (["train", "--sweep", "nope", "--out", "{out}"], "unknown sweep 'nope'; sweeps: "),
    (["train", "--out", "{out}"], "give exactly one of --preset NAME or --sweep NAME"),
    ([*TRAIN, "--sweep", "baseline"], "give exactly one of --preset NAME or --sweep NAME"),
    ([*TRAIN, "--set", "nonsense=1"], "bad --set 'nonsense=1': TrainConfig has no parameter 'nonsense'"),
    ([*TRAIN, "--set", "lr=fast"], "bad --set 'lr=fast': expected a float or none"),
    ([*TRAIN, "--set", "lr"], "bad --set 'lr': use FIELD=VALUE"),
    ([*TRAIN, "--set", "lr=0"], "lr must be positive"),
    ([*TRAIN, "--set", "k=4096"], "need 0 < k <= n_latents, got k=4096, n_latents=2048"),
    ([*TRAIN, "--set", "device=cuda:7"], "bad --set device=cuda:7: use --device instead"),
    ([*TRAIN, "--set", "max_tokens=5"], "bad --set max_tokens=5: use --n-tokens instead"),
    ([*TRAIN, "--install-trend"], "--install-trend installs the fit of an lr sweep (lr or relu-lr)"),
    ([*TRAIN, "--only", "*"], "--only picks presets of a sweep: give it with --sweep NAME"),
    (
        ["train", "--sweep", "lr", "--only", "relu-*", "--out", "{out}"],
        "--only relu-* matches no preset of sweep lr",
    ),
    ([*TRAIN, "--n-tokens", "0"], "argument --n-tokens: expected an integer >= 1, got '0'"),
    ([*TRAIN, "--ctx", "1"], "argument --ctx: expected an integer >= 4, got '1'"),
    ([*TRAIN, "--device", "bogus"], "--device bogus: not a torch device"),
    ([*TRAIN, "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ([*TRAIN, "--layer", "9"], "--layer 9: the model has blocks 0..3"),
    ([*TRAIN, "--out", "{file}"], "--out {file} is a file; give a folder"),
    ([*TRAIN, "--model", "{missing}"], "does not exist; give an alias"),
    (["explain", "--checkpoint", "{ckpt}"], "the following arguments are required: --latent"),
    ([*EXPLAIN, "--latent", "-1"], "argument --latent: expected a latent index >= 0, got '-1'"),
    ([*EXPLAIN, "--latent", "many"], "argument --latent"),
    ([*EXPLAIN, "--latent", "100000"], "latent 100000"),
    ([*EXPLAIN, "--latent", "1", "--examples", "0"], "argument --examples: expected an integer >= 1"),
    ([*EXPLAIN, "--latent", "1", "--device", "bogus"], "--device bogus: not a torch device"),
    (["explain", "--checkpoint", "{missing}", "--latent", "1"], "missing: no such file or folder"),
    (["tasks"], "the following arguments are required: tasks_command"),
    (["tasks", "list", "--select", "nope"], "no task or tag named 'nope'"),
    (["tasks", "list", "--select", ""], "empty task selection"),
    (["tasks", "list", "--include-tasks", "{missing}"], "does not exist; check the --include path"),
    (["tasks", "list", "--include-tasks", "{badtasks}"], "broken.yaml: not valid YAML"),
    (["leaderboard", "--results", "{missing}", "--out", "{out}"], "--results {missing} does not exist"),
    (["leaderboard", "--results", "{file}", "--out", "{out}"], "--results {file} is a file; give a folder"),
    (["leaderboard", "--results", "{empty}", "--out", "{out}"], "no result files under {empty}"),
    (["leaderboard", "--results", "{results}", "--out", "{out}", "--sort", "bogus.x"], "cannot sort by"),
    (["leaderboard", "--results", "{results}", "--out", "{out}", "--sort", "nmse"], "cannot sort by 'nmse'"),
    (["leaderboard", "--results", "{results}", "--out", "{file}"], "--out {file} is a file; give a folder"),
]


def expand(argv: list[str], paths: dict[str, Path]) -> list[str]:
    """argv with every `{name}` placeholder replaced by the path `prepare` made for it."""
    return [item.format(**{k: str(v) for k, v in paths.items()}) for item in argv]


def prepare(folder: Path) -> dict[str, Path]:
    """Make the files the cases refer to under `folder`; returns {placeholder: path}."""
    from saebench.model.tiny import tiny_model
    from saebench.results import RESULT_SCHEMA
    from saebench.sae.formats.native import save_native
    from tests.conftest import random_sae, write_corpus

    folder = Path(folder)
    paths = {
        name: folder / name
        for name in ("out", "model", "ckpt", "ckpts", "narrow", "missing", "empty", "results", "badtasks")
    }
    paths |= {"corpus": folder / "corpus.txt", "notckpt": folder / "notes.txt", "file": folder / "file.txt"}
    paths["cache"] = folder / "cache"
    model = tiny_model("llama", seed=0)
    model.hf_model.save_pretrained(paths["model"])
    model.tokenizer.save_pretrained(paths["model"])
    write_corpus(paths["corpus"])
    save_native(random_sae(64, 96, k=4, seed=1), paths["ckpt"])
    save_native(random_sae(64, 96, k=4, seed=2), paths["ckpts"] / "a")
    save_native(random_sae(64, 128, k=8, seed=3), paths["ckpts"] / "b")
    save_native(random_sae(32, 64, k=4, seed=4), paths["narrow"])
    paths["notckpt"].write_text("not a checkpoint\n")
    paths["file"].write_text("a plain file\n")
    paths["empty"].mkdir()
    paths["badtasks"].mkdir()
    (paths["badtasks"] / "broken.yaml").write_text("source: [unclosed\n")
    core = {
        "schema": RESULT_SCHEMA,
        "metric": "core",
        "checkpoint": {"label": "one", "sha256": "0" * 64, "architecture": "topk", "n_latents": 96, "k": 4},
        "headline": ["nmse"],
        "values": {"nmse": {"value": 0.5, "lo": 0.4, "hi": 0.6, "n": 6, "unit": "windows"}},
    }
    (paths["results"] / "one").mkdir(parents=True)
    (paths["results"] / "one" / "core.json").write_text(json.dumps(core))
    return paths
