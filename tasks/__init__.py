"""The built-in probe tasks, one YAML file each (schema: `saebench/data/tasks.py`).

This folder is installed as the package `saebench.builtin_tasks` (see pyproject.toml), so a wheel carries
these files and an editable install reads them here.
"""
