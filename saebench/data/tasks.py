"""Binary probe tasks: one YAML file each, found in the built-in `tasks/` folder and in user folders.

    name: 21_headline_istrump          # optional, defaults to the file stem
    source: sae-probes:21_headline_istrump
    text_column: prompt
    label_column: target
    positive_label: true               # labels equal to this are class 1 (true == 1 == "true")
    pool: mean                         # optional: mean | max | last
    max_tokens: 64                     # optional, BOS included
    n_train: 256                       # optional
    n_test: 256                        # optional
    tags: [news]                       # optional
    split: train                       # optional, for Hugging Face data sets

Every schema or data problem is a one-line `TaskError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from saebench.data.sources import SourceError, read_table, source_fingerprint

POOLS = ("mean", "max", "last")
TASK_SUFFIXES = (".yaml", ".yml")
DEFAULT_POOL = "mean"
DEFAULT_MAX_TOKENS = 64
DEFAULT_N_TRAIN = 256
DEFAULT_N_TEST = 256


class TaskError(ValueError):
    """A task file that does not follow the schema, or whose data cannot make a binary task."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One binary classification task, as its YAML file describes it."""

    # Unique task name; the file stem unless the YAML gives one.
    name: str
    # Where the table comes from: `sae-probes:<stem>`, a local file path, or a Hugging Face data set id.
    source: str
    # Column holding the text of each example.
    text_column: str
    # Column holding the label of each example.
    label_column: str
    # Label value that makes an example positive (class 1); everything else is class 0.
    positive_label: bool | int | float | str
    # How latents are pooled over positions 1.. of an example: mean, max or last.
    pool: str = DEFAULT_POOL
    # Examples are truncated to this many tokens, the BOS token included.
    max_tokens: int = DEFAULT_MAX_TOKENS
    # Training examples of the class-balanced split (fewer when the data set is smaller).
    n_train: int = DEFAULT_N_TRAIN
    # Test examples of the class-balanced split (fewer when the data set is smaller).
    n_test: int = DEFAULT_N_TEST
    # Labels for selecting groups of tasks (`saebench run --tasks news`).
    tags: tuple[str, ...] = ()
    # Split of a Hugging Face data set; None for file sources.
    split: str | None = None
    # The YAML file this task was read from; relative local sources are resolved against its folder.
    path: Path | None = None


# field -> (accepted types, description for the error message); bool is excluded from int fields below.
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "source": ((str,), "a string"),
    "text_column": ((str,), "a string"),
    "label_column": ((str,), "a string"),
    "positive_label": ((bool, int, float, str), "a boolean, number or string"),
    "pool": ((str,), f"one of {', '.join(POOLS)}"),
    "max_tokens": ((int,), "an integer >= 2"),
    "n_train": ((int,), "an integer >= 2"),
    "n_test": ((int,), "an integer >= 2"),
    "tags": ((list,), "a list of strings"),
    "split": ((str,), "a string"),
}
_REQUIRED = ("source", "text_column", "label_column", "positive_label")


#: the repository's top-level `tasks/` folder as installed (pyproject.toml maps it into the package): an
#: editable install finds the checkout's folder, a wheel its own copy
BUILTIN_TASKS_PACKAGE = "saebench.builtin_tasks"


def builtin_tasks_dir() -> Path:
    """The folder of the built-in tasks, the repository's `tasks/`, found through the installed package."""
    try:
        folder = importlib.resources.files(BUILTIN_TASKS_PACKAGE)
    except ModuleNotFoundError:
        raise TaskError(
            f"the built-in tasks ({BUILTIN_TASKS_PACKAGE}) are not installed: reinstall saebench "
            "(pip install -e . in the repository)"
        ) from None
    if not isinstance(folder, Path):  # e.g. imported from a zip file
        raise TaskError(f"the built-in tasks must be installed as files, not inside {folder}")
    return folder


def load_task(path: str | Path) -> Task:
    """Read and validate one task YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the task file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise TaskError(f"{path}: not valid YAML{line}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file must be a mapping of fields (source, text_column, ...)")
    unknown = sorted(str(key) for key in raw if key not in _FIELDS)
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(_FIELDS), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise TaskError(
            f"{path}: unknown field {unknown[0]!r}{did_you_mean}; allowed fields: {', '.join(_FIELDS)}"
        )
    for field in _REQUIRED:
        if raw.get(field) is None:
            raise TaskError(f"{path}: missing required field {field!r}")
    for field, value in raw.items():
        _check_type(path, field, value)
    return Task(
        name=raw.get("name", path.stem),
        source=raw["source"],
        text_column=raw["text_column"],
        label_column=raw["label_column"],
        positive_label=raw["positive_label"],
        pool=raw.get("pool", DEFAULT_POOL),
        max_tokens=raw.get("max_tokens", DEFAULT_MAX_TOKENS),
        n_train=raw.get("n_train", DEFAULT_N_TRAIN),
        n_test=raw.get("n_test", DEFAULT_N_TEST),
        tags=tuple(raw.get("tags") or ()),
        split=raw.get("split"),
        path=path,
    )


def _check_type(path: Path, field: str, value: Any) -> None:
    types, expected = _FIELDS[field]
    is_int_field = types == (int,)
    ok = isinstance(value, types) and not (is_int_field and isinstance(value, bool))
    if ok and is_int_field:
        ok = value >= 2
    if ok and field == "pool":
        ok = value in POOLS
    if ok and field == "tags":
        ok = all(isinstance(tag, str) and tag for tag in value)
    if ok and field in ("name", "tags"):
        # select_tasks splits its argument on commas, so names and tags cannot hold one.
        ok = all("," not in text for text in ([value] if field == "name" else value))
    if ok and isinstance(value, str):
        ok = bool(value.strip())
    if not ok:
        raise TaskError(f"{path}: field {field!r} must be {expected}, got {value!r}")


def load_task_data(task: Task) -> tuple[list[str], np.ndarray]:
    """The texts and boolean labels (True = positive) of a task, after checking that they make a binary task.

    Rows with an empty text or label are dropped.
    """
    where = str(task.path) if task.path is not None else f"task {task.name!r}"
    base_dir = task.path.parent if task.path is not None else None
    try:
        table = read_table(task.source, split=task.split, base_dir=base_dir)
    except SourceError as exc:
        raise TaskError(f"{where}: field 'source': {exc}") from None
    for field in ("text_column", "label_column"):
        column = getattr(task, field)
        if column not in table.columns:
            raise TaskError(
                f"{where}: field {field!r}: column {column!r} is not in {task.source} "
                f"(columns: {', '.join(map(str, table.columns))})"
            )
    table = table[[task.text_column, task.label_column]].dropna()
    if len(table) == 0:
        raise TaskError(f"{where}: field 'source': {task.source} has no rows with both text and label")
    label_keys = [_label_key(value) for value in table[task.label_column]]
    distinct = sorted(set(label_keys), key=repr)
    shown = ", ".join(repr(value) for value in distinct[:6]) + (", ..." if len(distinct) > 6 else "")
    if len(distinct) != 2:
        raise TaskError(
            f"{where}: field 'label_column': column {task.label_column!r} has {len(distinct)} distinct "
            f"labels ({shown}); a task needs exactly two"
        )
    positive = _label_key(task.positive_label)
    if positive not in distinct:
        raise TaskError(
            f"{where}: field 'positive_label': {task.positive_label!r} is not a label of column "
            f"{task.label_column!r} (labels: {shown})"
        )
    labels = np.array([key == positive for key in label_keys], dtype=bool)
    for cls, count in ((True, int(labels.sum())), (False, int((~labels).sum()))):
        if count < 2:
            kind = "positive" if cls else "negative"
            raise TaskError(
                f"{where}: field 'positive_label': only {count} {kind} example(s); a task needs 2 per class"
            )
    return [str(text) for text in table[task.text_column]], labels


def task_fingerprint(task: Task) -> str:
    """A stable identity of a task's definition and data, for cache keys and result provenance (hex)."""
    base_dir = task.path.parent if task.path is not None else None
    fields = {key: value for key, value in dataclasses.asdict(task).items() if key != "path"}
    fields["data"] = source_fingerprint(task.source, split=task.split, base_dir=base_dir)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _label_key(value: Any) -> bool | int | float | str:
    """A canonical form of a label, so that True, 1, 1.0, "1" and "true" compare equal."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else float(value)
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return int(text.lower() == "true")
    if re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        return int(float(text))
    return text


def discover_tasks(include_dirs: Iterable[str | Path] = ()) -> dict[str, Task]:
    """The built-in tasks plus those in `include_dirs`; a later folder's task overrides an earlier one's."""
    tasks: dict[str, Task] = {}
    folders = [builtin_tasks_dir(), *(Path(folder) for folder in include_dirs)]
    for folder in folders:
        if not folder.is_dir():
            raise TaskError(f"task folder {folder} does not exist; check the --include path")
        found: dict[str, Task] = {}
        for path in sorted(p for p in folder.iterdir() if p.suffix in TASK_SUFFIXES):
            task = load_task(path)
            if task.name in found:
                raise TaskError(
                    f"{path}: task name {task.name!r} is also used by {found[task.name].path}; rename one"
                )
            found[task.name] = task
        for name, task in found.items():
            if name in tasks:
                warnings.warn(f"task {name!r} from {task.path} overrides {tasks[name].path}", stacklevel=2)
            tasks[name] = task
    return tasks


def select_tasks(tasks: Mapping[str, Task], spec: str) -> list[Task]:
    """Tasks named by `spec`: comma-separated task names and/or tags, or `all`; in name order, no repeats."""
    chosen: dict[str, Task] = {}
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise TaskError("empty task selection: give task names, tags or `all` (see `saebench tasks list`)")
    all_tags = sorted({tag for task in tasks.values() for tag in task.tags})
    for item in items:
        if item == "all":
            matched = list(tasks.values())
        elif item in tasks:
            matched = [tasks[item]]
        else:
            matched = [task for task in tasks.values() if item in task.tags]
        if not matched:
            close = difflib.get_close_matches(item, list(tasks) + all_tags, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else "; see `saebench tasks list`"
            raise TaskError(f"no task or tag named {item!r}{hint}")
        for task in matched:
            chosen.setdefault(task.name, task)
    return sorted(chosen.values(), key=lambda task: _natural_key(task.name))


def balanced_split(labels: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint, class-balanced train and test indices (sorted int64 arrays).

    Each split holds n // 2 positives and n // 2 negatives.  When a class has fewer than
    n_train // 2 + n_test // 2 examples, both splits shrink in proportion and stay balanced.
    """
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    per_class = min(len(positives), len(negatives))
    want_train, want_test = n_train // 2, n_test // 2
    if per_class < 2 or want_train < 1 or want_test < 1:
        raise ValueError(
            f"balanced_split needs 2+ examples of each class and n_train, n_test >= 2 "
            f"(got {len(positives)} positive, {len(negatives)} negative, n_train={n_train}, n_test={n_test})"
        )
    if per_class >= want_train + want_test:
        k_train, k_test = want_train, want_test
    else:
        k_train = min(per_class - 1, max(1, round(per_class * want_train / (want_train + want_test))))
        k_test = per_class - k_train
    rng = np.random.default_rng(seed)
    train, test = [], []
    for members in (positives, negatives):
        shuffled = rng.permutation(members)
        train.append(shuffled[:k_train])
        test.append(shuffled[k_train : k_train + k_test])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def tasks_table(tasks: Iterable[Task] | Mapping[str, Task]) -> str:
    """A table of tasks for `saebench tasks list`: name, tags, source, rows, positives, train/test sizes."""
    from tabulate import tabulate

    rows = []
    items: Sequence[Task] = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    for task in sorted(items, key=lambda task: _natural_key(task.name)):
        _, labels = load_task_data(task)
        train, test = balanced_split(labels, task.n_train, task.n_test, seed=0)
        sizes = f"{len(train)}/{len(test)}"
        rows.append([task.name, ",".join(task.tags), task.source, len(labels), int(labels.sum()), sizes])
    return tabulate(rows, headers=["name", "tags", "source", "rows", "positives", "train/test"])


def _natural_key(name: str) -> list[int | str]:
    """Sort `5_x` before `21_x`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
