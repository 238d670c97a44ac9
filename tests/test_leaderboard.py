import json
import re

import numpy as np
import pytest

from saebench.leaderboard import collect_rows, generate, table
from saebench.leaderboard.claims import fit_power_law
from saebench.results import RESULT_SCHEMA


def write(folder, label, arch, n, k, nmse, l0, dead, variant=None, delta_ce=None, lr=None):
    # the ablation run's training config departs from the recipe: the leaderboard reads that from it
    config = {"activation": arch, "auxk_alpha": 0.0, "tied_init": False} if variant else {"activation": arch}
    config["lr"] = lr
    ck = {
        "label": label,
        "architecture": arch,
        "n_latents": n,
        "k": k,
        "sha256": label,
        "training": {"config": config},
    }
    core = {
        "schema": RESULT_SCHEMA,
        "metric": "core",
        "checkpoint": ck,
        "headline": ["nmse", "l0", "dead_frac"],
        "lower_is_better": ["nmse", "dead_frac"],
        "values": {
            "nmse": {"value": nmse, "lo": nmse * 0.9, "hi": nmse * 1.1, "n": 10, "unit": "windows"},
            "l0": {"value": l0, "lo": l0, "hi": l0, "n": 10, "unit": "windows"},
            "dead_frac": {"value": dead, "lo": None, "hi": None, "n": n, "unit": "latents"},
        },
    }
    (folder / label).mkdir(parents=True)
    (folder / label / "core.json").write_text(json.dumps(core))
    if delta_ce is not None:
        down = {
            "schema": RESULT_SCHEMA,
            "metric": "downstream",
            "checkpoint": ck,
            "headline": ["delta_ce"],
            "lower_is_better": ["delta_ce"],
            "values": {"delta_ce": {"value": delta_ce, "lo": 0, "hi": 1, "n": 10, "unit": "windows"}},
        }
        (folder / label / "downstream.json").write_text(json.dumps(down))


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    for n in (1024, 2048, 4096, 8192):
        write(r, f"topk-n{n}-k32", "topk", n, 32, 0.05 + 3.0 * n**-0.5, 32, 0.01, delta_ce=0.1)
    write(r, "topk-n1024-k16", "topk", 1024, 16, 0.2, 16, 0.02)
    write(r, "relu-n1024", "relu", 1024, None, 0.3, 24, 0.3)
    write(r, "topk-n1024-k32-plain", "topk", 1024, 32, 0.2, 32, 0.4, variant="no-auxk-no-tied-init")
    return r


def test_table_has_rows_columns_and_sorts(results):
    rows = collect_rows([results])
    text = table(rows, sort="core.nmse")
    lines = [line for line in text.splitlines() if line.startswith("| ") and "checkpoint" not in line]
    assert len(lines) == 7
    assert "topk-n8192-k32" in lines[0]  # lowest nmse first
    assert "core.nmse" in text and "downstream.delta_ce" in text
    assert "0.08315 [0.07483, 0.09146]" in text  # n=8192: 0.05 + 3/sqrt(8192), with its interval
    with pytest.raises(ValueError, match="cannot sort by"):
        table(rows, sort="core.bogus")


def test_power_law_fit_recovers_parameters():
    n = np.array([1024, 2048, 4096, 8192, 16384], dtype=float)
    a, b, c = fit_power_law(n, 3.0 * n**-0.5 + 0.05)
    assert b == pytest.approx(-0.5, abs=0.01) and c == pytest.approx(0.05, abs=0.002)
    assert a == pytest.approx(3.0, rel=0.05)


def test_generate_writes_readme_claims_and_plots(results, tmp_path):
    out = tmp_path / "lb"
    path = generate([results], out)
    text = path.read_text()
    assert "for 1 of 1 comparable ReLU checkpoints" in text
    assert "dead fraction at most 0.0200" in text and "(topk (no AuxK, untied init)): 0.4000" in text
    assert "with nmse 0.2000 against 0.1437 for the recipe at the same n and k (topk-n1024-k32)" in text
    assert "ReLU + L1 for contrast: 0.3000 to 0.3000 over 1 checkpoints" in text
    fit = re.search(r"k=32: .*fit nmse = ([0-9.]+) n\^(-[0-9.]+) \+ ([0-9.]+): falls with n", text)
    assert (
        fit
        and float(fit[2]) == pytest.approx(-0.5, abs=0.01)
        and float(fit[3]) == pytest.approx(0.05, abs=0.002)
    )
    for png in ("nmse_vs_l0.png", "delta_ce_vs_l0.png", "dead_frac.png"):
        assert (out / png).stat().st_size > 1000


def test_empty_results_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no result files"):
        generate([tmp_path], tmp_path / "lb")


def test_power_law_claim_reports_when_nmse_rises_with_n(tmp_path):
    from saebench.leaderboard.claims import claim_power_law

    for n in (1024, 2048, 4096):
        write(tmp_path, f"topk-n{n}", "topk", n, 32, 0.2 + 0.01 * n / 1024, 32, 0.0)
    assert "does NOT fall with n here" in claim_power_law(collect_rows([tmp_path]))


def test_power_law_is_fitted_per_topk_family_and_lr_variants_stay_out_of_the_dead_latent_claim(tmp_path):
    from saebench.leaderboard.claims import claim_dead_latents, claim_power_law

    for n in (1024, 2048, 4096):
        write(tmp_path, f"topk-n{n}", "topk", n, 32, 0.2 + 0.01 * n / 1024, 32, 0.0)
        write(tmp_path, f"topk-n{n}-fixedlr", "topk", n, 32, 0.05 + 3.0 * n**-0.5, 32, 0.5, lr=5e-4)
    rows = collect_rows([tmp_path])
    assert {r.family for r in rows} == {"topk", "topk (lr 0.0005)"}
    lines = claim_power_law(rows).splitlines()
    assert lines[1].startswith("  - k=32:") and "does NOT fall with n here" in lines[1]
    assert lines[2].startswith("  - topk (lr 0.0005), k=32:") and "falls with n" in lines[2]
    dead = claim_dead_latents(rows)
    assert "over 3 checkpoints" in dead and "0.5000" not in dead
