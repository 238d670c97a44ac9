"""The README's runnable examples run as written, on the tiny model.

A runnable example is a ```python block whose opening fence follows the line `<!-- runnable -->` (an HTML
comment, invisible on GitHub).  Each runs in a fresh namespace, with these substitutions and nothing else:

    "path/to/checkpoint"   a tiny native TopK checkpoint (d_in 64, 96 latents, k 4) written by the test
    "results"              a results folder with core and downstream results of that checkpoint on the tiny
                           model (the string literal, quotes included, as `saebench run --out` defaults it)
    x                      predefined: tiny residuals, torch.randn(5, 64), the checkpoint's input width

A block that names a path outside these fails, and so does one that raises.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- runnable -->"


def runnable_blocks(text: str) -> list[str]:
    """The code of every ```python block right after a `<!-- runnable -->` line."""
    pattern = re.compile(rf"^{re.escape(MARKER)}\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    return pattern.findall(text)


def test_the_marker_finds_blocks_and_only_marked_ones():
    text = "x\n<!-- runnable -->\n```python\na = 1\n```\n\n```python\nb = 2\n```\n"
    assert runnable_blocks(text) == ["a = 1\n"]
    assert len(runnable_blocks(README.read_text())) == README.read_text().count(MARKER) >= 2


@pytest.fixture(scope="module")
def substitutions(tmp_path_factory, tiny_llama):
    from saebench.runner import RunConfig, Runner
    from saebench.sae.formats.native import save_native
    from tests.conftest import random_sae, tiny_eval_config, write_corpus

    tmp = tmp_path_factory.mktemp("readme")
    checkpoint = save_native(random_sae(64, 96, k=4, seed=1), tmp / "topk-n96-k4")
    config = RunConfig(
        checkpoint=str(checkpoint),
        metrics=["core", "downstream"],
        eval=tiny_eval_config(tmp, write_corpus(tmp / "corpus.txt")),
        out=str(tmp / "results"),
    )
    Runner(config, model=tiny_llama).run()
    return {'"path/to/checkpoint"': repr(str(checkpoint)), '"results"': repr(str(tmp / "results"))}


@pytest.mark.parametrize("index", range(README.read_text().count(MARKER)))
def test_readme_example_runs(index, substitutions):
    code = runnable_blocks(README.read_text())[index]
    for literal, path in substitutions.items():
        code = code.replace(literal, path)
    assert "path/to/" not in code, "a runnable README block names a path the test does not provide"
    namespace = {"x": torch.randn(5, 64, generator=torch.Generator().manual_seed(0))}
    exec(compile(code, f"README.md runnable block {index}", "exec"), namespace)
    if "sae" in namespace:  # the notebook example: what it computes is what it says
        x, sae = namespace["x"], namespace["sae"]
        assert namespace["codes"].indices.shape == (5, 4)
        torch.testing.assert_close(namespace["x_hat"], sae(x))
    if "df" in namespace:
        assert len(namespace["df"]) == 12 and set(namespace["df"].metric) == {"core", "downstream"}
