"""Task YAML schema, label mapping, data checks, balanced splits, discovery and selection."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from saebench.data.tasks import (
    TaskError,
    balanced_split,
    builtin_tasks_dir,
    discover_tasks,
    load_task,
    load_task_data,
    select_tasks,
    task_fingerprint,
    tasks_table,
)

GROUP_TAGS = {"people-places", "news", "compound-words", "code", "sentiment-style"}
MINIMAL = "source: data.csv\ntext_column: prompt\nlabel_column: target\npositive_label: 1\n"


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def _data(folder, targets, prompts=None):
    prompts = prompts or [f"text {i}" for i in range(len(targets))]
    pd.DataFrame({"prompt": prompts, "target": targets}).to_csv(folder / "data.csv", index=False)


def test_minimal_task_gets_defaults_and_stem_name(tmp_path):
    task = load_task(_write(tmp_path, "my_task.yaml", MINIMAL))
    assert (task.name, task.pool, task.max_tokens, task.n_train, task.n_test) == (
        "my_task",
        "mean",
        64,
        256,
        256,
    )
    assert task.tags == () and task.split is None and task.positive_label == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ("pooling: max\n", r"unknown field 'pooling' \(did you mean 'pool'\?\)"),
        ("pool: median\n", r"field 'pool' must be one of mean, max, last, got 'median'"),
        ("n_train: many\n", r"field 'n_train' must be an integer >= 2, got 'many'"),
        ("n_test: true\n", r"field 'n_test' must be an integer >= 2, got True"),
        ("max_tokens: 1\n", r"field 'max_tokens' must be an integer >= 2, got 1"),
        ("tags: news\n", r"field 'tags' must be a list of strings, got 'news'"),
        ("tags: [a, 3]\n", r"field 'tags' must be a list of strings"),
        ("name: 'a,b'\n", r"field 'name' must be a string, got 'a,b'"),
        ("positive_label: [1]\n", r"field 'positive_label' must be a boolean, number or string"),
    ],
)
def test_schema_errors_name_file_and_field(tmp_path, extra, message):
    body = MINIMAL.replace("positive_label: 1\n", "") if extra.startswith("positive_label") else MINIMAL
    path = _write(tmp_path, "bad.yaml", body + extra)
    with pytest.raises(TaskError, match=message) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_missing_field_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(TaskError, match="missing required field 'label_column'"):
        load_task(_write(tmp_path, "a.yaml", MINIMAL.replace("label_column: target\n", "")))
    with pytest.raises(TaskError, match="must be a mapping"):
        load_task(_write(tmp_path, "b.yaml", "- just\n- a list\n"))
    with pytest.raises(TaskError, match="not valid YAML at line 2"):
        load_task(_write(tmp_path, "c.yaml", "source: x\n  bad: [indent\n"))


@pytest.mark.parametrize(
    "targets, positive",
    [
        ([True, False, True, False, True], 1),
        ([1, 0, 1, 0, 1], True),
        ([1, 0, 1, 0, 1], "1"),
        (["yes", "no", "yes", "no", "yes"], "yes"),
        (["Democratic Party", "R", "Democratic Party", "R", "Democratic Party"], "Democratic Party"),
    ],
)
def test_labels_map_to_booleans(tmp_path, targets, positive):
    _data(tmp_path, targets)
    task = load_task(
        _write(tmp_path, "t.yaml", MINIMAL.replace("positive_label: 1", f"positive_label: {positive!r}"))
    )
    texts, labels = load_task_data(task)
    assert texts == [f"text {i}" for i in range(5)]
    assert labels.dtype == bool and labels.tolist() == [True, False, True, False, True]


def test_false_as_positive_label_selects_the_false_rows(tmp_path):
    _data(tmp_path, [True, False, True, False])
    task = load_task(
        _write(tmp_path, "t.yaml", MINIMAL.replace("positive_label: 1", "positive_label: false"))
    )
    assert load_task_data(task)[1].tolist() == [False, True, False, True]


@pytest.mark.parametrize(
    "targets, change, message",
    [
        (
            [1, 0, 1, 0],
            ("text_column: prompt", "text_column: sentence"),
            r"field 'text_column': column 'sentence' is not in data.csv \(columns: prompt, target\)",
        ),
        (
            [0, 1, 2, 0, 1, 2],
            None,
            r"field 'label_column': column 'target' has 3 distinct labels \(0, 1, 2\)",
        ),
        (
            [0, 1, 0, 1],
            ("positive_label: 1", "positive_label: 'yes'"),
            r"field 'positive_label': 'yes' is not a label of column 'target'",
        ),
        ([1, 0, 0, 0], None, r"field 'positive_label': only 1 positive example\(s\)"),
        ([], None, r"field 'source': data.csv has no rows"),
        ([1, 0], ("source: data.csv", "source: other.csv"), r"field 'source': data file not found"),
    ],
)
def test_data_errors_name_file_and_field(tmp_path, targets, change, message):
    _data(tmp_path, targets)
    text = MINIMAL.replace(*change) if change else MINIMAL
    path = _write(tmp_path, "t.yaml", text)
    with pytest.raises(TaskError, match=message) as info:
        load_task_data(load_task(path))
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_balanced_split_is_balanced_disjoint_and_seeded():
    labels = np.array([True] * 300 + [False] * 700)
    train, test = balanced_split(labels, 256, 100, seed=0)
    assert len(train) == 256 and len(test) == 100
    assert labels[train].sum() == 128 and labels[test].sum() == 50
    assert not set(train) & set(test)
    again, _ = balanced_split(labels, 256, 100, seed=0)
    other, _ = balanced_split(labels, 256, 100, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_balanced_split_shrinks_when_a_class_is_short():
    labels = np.array([True] * 30 + [False] * 500)
    train, test = balanced_split(labels, 256, 256, seed=0)
    assert len(train) == len(test) == 30  # 15 positives each: the 30 positives are shared evenly
    assert labels[train].sum() == 15 and labels[test].sum() == 15
    assert not set(train) & set(test)
    tiny = np.array([True, True, False, False, False])
    train, test = balanced_split(tiny, 256, 256, seed=0)
    assert len(train) == len(test) == 2 and tiny[train].sum() == tiny[test].sum() == 1
    with pytest.raises(ValueError, match="2\\+ examples of each class"):
        balanced_split(np.array([True, False, False]), 4, 4, seed=0)


def test_builtin_suite_has_61_tasks_that_all_load():
    tasks = discover_tasks()
    assert len(tasks) == 61
    assert {path.stem for path in builtin_tasks_dir().glob("*.yaml")} == set(tasks)
    for task in tasks.values():
        assert task.source.startswith("sae-probes:"), task.name
        assert len(GROUP_TAGS.intersection(task.tags)) == 1, task.name
        texts, labels = load_task_data(task)
        assert len(texts) >= 1000 and 0.3 < labels.mean() < 0.7, task.name
    assert len(select_tasks(tasks, "code")) == 3
    assert len(select_tasks(tasks, "compound-words")) == 10


def test_user_folder_adds_and_overrides_with_a_warning(tmp_path):
    _data(tmp_path, [1, 0, 1, 0])
    _write(tmp_path, "extra.yaml", MINIMAL + "tags: [mine]\n")
    _write(tmp_path, "override.yaml", MINIMAL + "name: 21_headline_istrump\n")
    with pytest.warns(UserWarning, match="task '21_headline_istrump' from .*override.yaml overrides"):
        tasks = discover_tasks([tmp_path])
    assert len(tasks) == 62
    assert tasks["21_headline_istrump"].source == "data.csv"
    assert load_task_data(tasks["21_headline_istrump"])[1].tolist() == [True, False, True, False]
    assert [task.name for task in select_tasks(tasks, "mine")] == ["extra"]


def test_missing_folder_and_duplicate_names_are_errors(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        discover_tasks([tmp_path / "nowhere"])
    _write(tmp_path, "a.yaml", MINIMAL + "name: same\n")
    _write(tmp_path, "b.yaml", MINIMAL + "name: same\n")
    with pytest.raises(TaskError, match="task name 'same' is also used by .*a.yaml"):
        discover_tasks([tmp_path])


def test_select_by_names_tags_and_all():
    tasks = discover_tasks()
    chosen = select_tasks(tasks, "159_code_Python, news,21_headline_istrump")
    names = [task.name for task in chosen]
    assert names[0] == "21_headline_istrump" and "159_code_Python" in names
    assert len(names) == len(set(names)) == 13
    assert len(select_tasks(tasks, "all")) == 61
    with pytest.raises(TaskError, match="no task or tag named 'sentimnet'; close matches: sentiment"):
        select_tasks(tasks, "sentimnet")


def test_tasks_table_lists_sizes(tmp_path):
    _data(tmp_path, [1, 0] * 10 + [0] * 5)
    task = load_task(_write(tmp_path, "small.yaml", MINIMAL + "n_train: 8\nn_test: 100\ntags: [x, y]\n"))
    table = tasks_table([task])
    header, _, row = table.splitlines()
    assert header.split() == ["name", "tags", "source", "rows", "positives", "train/test"]
    # 10 positives shared in proportion 4 : 50 -> 1 train and 9 test per class.
    assert row.split() == ["small", "x,y", "data.csv", "25", "10", "2/18"]


def test_task_fingerprint_follows_definition_and_data(tmp_path):
    _data(tmp_path, [1, 0, 1, 0])
    path = _write(tmp_path, "t.yaml", MINIMAL)
    first = task_fingerprint(load_task(path))
    assert task_fingerprint(load_task(path)) == first
    _write(tmp_path, "t.yaml", MINIMAL + "pool: max\n")
    assert task_fingerprint(load_task(path)) != first
    _write(tmp_path, "t.yaml", MINIMAL)
    _data(tmp_path, [1, 0, 0, 1])
    assert task_fingerprint(load_task(path)) != first
