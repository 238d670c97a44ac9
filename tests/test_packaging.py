"""The package as users install it: a wheel carries the top-level tasks/ folder as saebench.builtin_tasks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

import saebench
from saebench.data.tasks import builtin_tasks_dir, discover_tasks

REPO = Path(__file__).resolve().parents[1]
N_BUILTIN_TASKS = 61


def test_pyproject_lists_every_package_and_maps_tasks():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_packages(str(REPO), include=["saebench", "saebench.*"])
    assert sorted(config["packages"]) == sorted([*found, "saebench.builtin_tasks"])
    assert config["package-dir"] == {"saebench.builtin_tasks": "tasks"}


def test_editable_checkout_reads_its_own_tasks_folder():
    if not Path(saebench.__file__).resolve().is_relative_to(REPO):
        pytest.skip("saebench is not installed from this checkout")
    assert builtin_tasks_dir() == REPO / "tasks"
    assert {task.path.parent for task in discover_tasks().values()} == {REPO / "tasks"}


def test_wheel_carries_the_builtin_tasks(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("saebench", "tasks"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), "."],
        cwd=source,
        check=True,
    )
    (wheel,) = (tmp_path / "wheels").glob("saebench-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    shutil.rmtree(source)  # nothing may be read from the build copy

    probe = (
        "import json, saebench; from saebench.data.tasks import discover_tasks; "
        "print(json.dumps({'package': saebench.__file__, "
        "'tasks': {n: str(t.path) for n, t in discover_tasks().items()}}))"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=outside,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "SAEBENCH_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(run.stdout)
    assert Path(found["package"]).is_relative_to(site)
    assert len(found["tasks"]) == N_BUILTIN_TASKS
    folders = {Path(path).parent for path in found["tasks"].values()}
    assert folders == {site / "saebench" / "builtin_tasks"}
    assert not any(Path(path).is_relative_to(REPO) for path in found["tasks"].values())
