import json
import re

import numpy as np
import pytest

from saebench.leaderboard import collect_rows, generate, table
from saebench.leaderboard.claims import fit_power_law
from saebench.results import RESULT_SCHEMA


def write(
    folder,
    label,
    arch,
    n,
    k,
    nmse,
    l0,
    dead,
    variant=None,
    delta_ce=None,
    lr=None,
    rel=0.1,
    space=None,
    windows=None,
    model=None,
):
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
    if space:
        ck["normalization"] = space
    if model:
        ck["d_in"] = model[1]
    core = {
        "schema": RESULT_SCHEMA,
        "metric": "core",
        "checkpoint": ck,
        "headline": ["nmse", "l0", "dead_frac"],
        "lower_is_better": ["nmse", "dead_frac"],
        "values": {
            "nmse": {
                "value": nmse,
                "lo": nmse * (1 - rel),
                "hi": nmse * (1 + rel),
                "n": 10,
                "unit": "windows",
            },
            "l0": {"value": l0, "lo": l0, "hi": l0, "n": 10, "unit": "windows"},
            "dead_frac": {"value": dead, "lo": None, "hi": None, "n": n, "unit": "latents"},
        },
    }
    if windows is not None:
        core["details"] = {"nmse_windows": windows}
        core["data_key"] = {"windows": "shared"}
    if model:
        core["data_key"] = {**core.get("data_key", {}), "model": f"{model[0]}@pkg==1.0"}
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
    assert "dead fraction at most 0.0200" in text
    assert (
        "topk-n1024-k32-plain (topk (no AuxK, untied init)): 0.4000 against 0.0100 for topk-n1024-k32 "
        "(topk), with nmse 0.2000 against 0.1437" in text
    )
    assert "ReLU + L1 for contrast: 0.3000 to 0.3000 over 1 checkpoints" in text
    fit = re.search(r"k=32: .*fit nmse = ([0-9.]+) n\^(-[0-9.]+) \+ ([0-9.]+): falls with n", text)
    assert (
        fit
        and float(fit[2]) == pytest.approx(-0.5, abs=0.01)
        and float(fit[3]) == pytest.approx(0.05, abs=0.002)
    )
    for png in ("nmse_vs_l0.png", "delta_ce_vs_l0.png", "dead_frac.png"):
        assert (out / png).stat().st_size > 1000


def test_dead_latent_pairs_match_the_twin_with_the_same_settings(results):
    from saebench.leaderboard import dead_pairs
    from saebench.leaderboard.claims import HOLDS, measure_dead_latents

    # the same pair at a set lr: each variant is compared with the recipe at that lr, not the baseline
    write(results, "topk-n1024-k32-lr8e-3", "topk", 1024, 32, 0.3, 32, 0.1, lr=8e-3)
    variant = "topk-n1024-k32-lr8e-3-noauxk-untied"
    write(results, variant, "topk", 1024, 32, 0.3, 32, 0.6, variant="x", lr=8e-3)
    rows = collect_rows([results])
    pairs = {r.label: t.label for r, t in dead_pairs(rows)}
    assert pairs == {
        "topk-n1024-k32-plain": "topk-n1024-k32",
        variant: "topk-n1024-k32-lr8e-3",
    }
    assert measure_dead_latents(rows).verdict == HOLDS  # the fixture's dead fractions have no interval

    from saebench.leaderboard.plots import dead_history_figure

    assert dead_history_figure(rows) is None  # no run recorded its dead count over training
    for label in pairs.keys() | pairs.values():
        path = results / label / "core.json"
        core = json.loads(path.read_text())
        core["checkpoint"]["training"]["dead_history"] = [[0, 0.0], [1000, 0.2], [2000, 0.3]]
        path.write_text(json.dumps(core))
    fig = dead_history_figure(collect_rows([results]))
    assert len(fig.axes[0].lines) == 4  # the two pairs, one line per run


def test_a_fixed_lr_run_is_its_own_family(tmp_path):
    write(tmp_path, "topk-n4096-k32-fixedlr", "topk", 4096, 32, 0.2, 32, 0.0)
    path = tmp_path / "topk-n4096-k32-fixedlr" / "core.json"
    core = json.loads(path.read_text())
    core["checkpoint"]["training"]["config"]["lr_at_n"] = 2048
    path.write_text(json.dumps(core))
    (row,) = collect_rows([tmp_path])
    assert row.family == "topk (lr of n=2048)" and not row.mitigations_off


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


# --- fits ------------------------------------------------------------------------------------------
def _inside(coef, truth):
    return coef.lo <= truth <= coef.hi


def test_ln_fit_recovers_planted_coefficients_from_result_files(tmp_path):
    from saebench.leaderboard.fits import ln_fits

    for n in (1024, 2048, 4096, 8192, 16384, 32768):
        write(tmp_path, f"topk-n{n}-k32", "topk", n, 32, 3.0 * n**-0.5 + 0.05, 32, 0.0, rel=0.01)
    (fit,) = ln_fits(collect_rows([tmp_path]), "topk")
    assert fit.flag is None and fit.resampling == "normal approximation"
    for name, truth in (("a", 3.0), ("b", -0.5), ("c", 0.05)):
        assert _inside(fit.coef[name], truth), (name, fit.coef[name])
    assert fit.coef["b"].value == pytest.approx(-0.5, abs=0.01)
    assert fit.curve([4096])[0] == pytest.approx(3.0 / 64 + 0.05, rel=1e-3)


PLANTED = {"alpha": 1.0, "beta_k": -0.3, "beta_n": -0.25, "gamma": -0.03, "zeta": -2.5, "eta": -0.3}


def _planted(n, k):
    from saebench.leaderboard.fits import JOINT_NAMES, joint_law

    params = np.array([PLANTED[c] for c in JOINT_NAMES])
    return float(joint_law(params, np.array([float(n)]), np.array([float(k)]))[0])


def test_lnk_fit_recovers_planted_coefficients_from_result_files(tmp_path):
    from saebench.leaderboard.fits import lnk_fit

    for k in (8, 16, 32, 64):
        for n in (2048, 4096, 8192, 16384, 32768, 65536):
            write(tmp_path, f"topk-n{n}-k{k}", "topk", n, k, _planted(n, k), k, 0.0, rel=0.01)
    fit = lnk_fit(collect_rows([tmp_path]), "topk", n_boot=100)
    assert fit.flag is None and len(fit.points) == 24
    for name, truth in PLANTED.items():
        assert _inside(fit.coef[name], truth), (name, fit.coef[name])
        assert fit.coef[name].value == pytest.approx(truth, abs=0.02)
    assert fit.coef["gamma"].below_zero and fit.coef["eta"].below_zero


def test_fits_resample_the_windows_when_the_result_files_keep_them(tmp_path):
    from saebench.leaderboard.fits import ln_fits

    rng = np.random.default_rng(0)
    shared = rng.uniform(0.8, 1.2, 200)  # one window set, scored by every checkpoint: errors move together
    for n in (1024, 2048, 4096, 8192, 16384):
        nmse = 3.0 * n**-0.5 + 0.05
        den = rng.uniform(50, 150, 200)
        num = den * nmse * shared * (1 + 0.002 * rng.standard_normal(200))
        num *= nmse * den.sum() / num.sum()  # the file's nmse is exactly the planted one
        windows = {"num": num.tolist(), "den": den.tolist()}
        write(tmp_path, f"topk-n{n}", "topk", n, 32, nmse, 32, 0.0, rel=0.05, windows=windows)
    (fit,) = ln_fits(collect_rows([tmp_path]), "topk")
    assert fit.resampling == "windows" and fit.flag is None
    assert _inside(fit.coef["b"], -0.5) and fit.coef["b"].hi - fit.coef["b"].lo < 0.3


def test_a_fit_on_too_few_or_too_noisy_points_is_flagged(tmp_path):
    from saebench.leaderboard.fits import fits_section, ln_fits, lnk_fit

    for n in (1024, 2048, 4096):
        write(tmp_path / "few", f"topk-n{n}", "topk", n, 32, 3.0 * n**-0.5 + 0.05, 32, 0.0)
    rows = collect_rows([tmp_path / "few"])
    assert ln_fits(rows, "topk")[0].flag.startswith("too few points: 3 sizes n")
    assert lnk_fit(rows, "topk").flag.startswith("too few points")
    text = fits_section(rows)
    assert "flagged: too few points" in text and "a n^b + c needs 4 or more" in text
    for n, wiggle in zip((1024, 2048, 4096, 8192, 16384), (0, 0.004, -0.002, 0.003, -0.003), strict=True):
        write(tmp_path / "noisy", f"topk-n{n}", "topk", n, 32, 0.3 + wiggle, 32, 0.0, rel=0.2)
    (noisy,) = ln_fits(collect_rows([tmp_path / "noisy"]), "topk")
    assert noisy.flag and noisy.flag.split(":")[0] in (
        "too noisy",
        "nmse does not fall with n (the best a n^b + c has a <= 0)",
    )
    assert "no law" in noisy.law_text()


# --- tables ------------------------------------------------------------------------------------------
def test_compact_table_bolds_the_best_and_marks_ties(tmp_path):
    from saebench.leaderboard.tables import TIE, best_and_ties, compact_table

    write(tmp_path, "best", "topk", 4096, 32, 0.200, 32, 0.0, rel=0.05)  # [0.19, 0.21]
    write(tmp_path, "tied", "topk", 2048, 32, 0.215, 32, 0.0, rel=0.05)  # [0.204, 0.226]: overlaps
    write(tmp_path, "apart", "topk", 1024, 32, 0.300, 32, 0.0, rel=0.05)  # [0.285, 0.315]
    rows = collect_rows([tmp_path])
    assert best_and_ties(rows, ("core", "nmse")) == ("best", {"tied"})
    assert best_and_ties(rows, ("core", "l0")) == (None, set())  # L0 has no better direction
    lines = {line.split("|")[1].strip(): line for line in compact_table(rows).splitlines()[2:]}
    assert "**0.2**" in lines["best"] and f"0.215 {TIE}" in lines["tied"]
    assert "0.3 " in lines["apart"] and TIE not in lines["apart"] and "**" not in lines["apart"].split("|")[6]
    assert [line.split("|")[1].strip() for line in compact_table(rows).splitlines()[2:]] == [
        "best",
        "tied",
        "apart",
    ]


def test_a_row_in_another_nmse_space_is_flagged_and_left_out(tmp_path):
    from saebench.leaderboard import for_comparison, space_warnings
    from saebench.leaderboard.tables import OFF_SPACE, compact_table

    for n in (1024, 2048, 4096):
        write(tmp_path, f"topk-n{n}", "topk", n, 32, 0.3 - 0.01 * n / 1024, 32, 0.0, space="layer_norm")
    write(tmp_path, "builtin-pca-topk-raw-k32", "pca-topk", 1152, 32, 0.03, 32, 0.1, space="none")
    rows = collect_rows([tmp_path])
    (warning,) = space_warnings(rows)
    assert "builtin-pca-topk-raw-k32's core.nmse is in raw space" in warning and "layer_norm space" in warning
    table_lines = compact_table(rows, "core.nmse").splitlines()[2:]
    assert table_lines[-1].split("|")[1].strip() == "builtin-pca-topk-raw-k32"  # listed last despite 0.03
    assert f"0.03 {OFF_SPACE}" in table_lines[-1] and "**0.26**" in table_lines[0]
    compared = {r.label: r for r in for_comparison(rows)}
    assert compared["builtin-pca-topk-raw-k32"].get("core", "nmse") is None
    assert compared["builtin-pca-topk-raw-k32"].get("core", "dead_frac") == 0.1
    text = generate([tmp_path], tmp_path / "lb").read_text()
    assert warning in text and "| raw " in text


# --- plots ------------------------------------------------------------------------------------------
def test_plots_are_made_from_fixture_results_with_one_line_per_family_and_n(results, tmp_path):
    from saebench.leaderboard.plots import nice_log_ticks, vs_l0_figure
    from saebench.metrics.registry import get_metric

    rows = collect_rows([results])
    plot = next(p for p in get_metric("core").plots if p.file == "nmse_vs_l0.png")
    fig = vs_l0_figure(rows, "core", plot)
    series = [line for line in fig.axes[0].get_lines() if line.get_gid() == "series"]
    # topk at n = 1024 (k 16 and 32: one line of 2 points), 2048, 4096, 8192; relu n=1024; the variant
    assert len(series) == 6
    assert sorted(len(line.get_xdata()) for line in series) == [1, 1, 1, 1, 1, 2]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "16" in labels and "32" in labels and not any("^" in t or "times" in t for t in labels)
    assert nice_log_ticks(2048, 16384) == [2048, 4096, 8192, 16384]
    out = tmp_path / "lb"
    generate([results], out)
    for name in ("nmse_vs_l0", "metrics_vs_n", "nmse_vs_n_fits", "delta_ce_vs_l0"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").stat().st_size > 1000


def test_fits_figure_draws_the_fitted_law_over_its_points(tmp_path):
    from saebench.leaderboard.plots import fits_figure

    for n in (1024, 2048, 4096, 8192, 16384):
        write(tmp_path, f"topk-n{n}", "topk", n, 32, 3.0 * n**-0.5 + 0.05, 32, 0.0, rel=0.01)
    ax = fits_figure(collect_rows([tmp_path])).axes[0]
    assert [line.get_gid() for line in ax.get_lines()].count("fit") == 1  # L(N); L(N, K) needs 3 k's
    assert [line.get_gid() for line in ax.get_lines()].count("series") == 1


# --- claims ------------------------------------------------------------------------------------------
def test_claims_table_verdicts_follow_the_rule(results, tmp_path):
    from saebench.leaderboard.claims import FAILS, HOLDS, UNMEASURED, UNSEPARATED, claims_table, verdict

    assert verdict(3, 0, 4) == HOLDS and verdict(2, 0, 4) == UNSEPARATED and verdict(5, 1, 6) == FAILS
    assert verdict(0, 0, 0) == UNMEASURED
    table = {row[0]: row for row in claims_table(collect_rows([results]))}
    frontier = table["TopK beats ReLU on the nmse-L0 frontier."]
    assert frontier[3] == f"**{HOLDS}**" and "1 of 1 ReLU checkpoints" in frontier[2]
    for n in (1024, 2048, 4096, 8192):
        write(tmp_path / "rising", f"topk-n{n}", "topk", n, 32, 0.2 + 0.05 * n / 1024, 32, 0.0, rel=0.01)
    rising = {row[0]: row for row in claims_table(collect_rows([tmp_path / "rising"]))}
    power = rising["nmse falls as a power law in n with an irreducible term. (topk)"]
    assert power[3] == f"**{FAILS}**" and "nmse rises from 0.2500" in power[2]


def test_builtin_reference_dictionaries_are_left_out_of_the_claims(results):
    from saebench.leaderboard.claims import claims_section

    write(results, "builtin-pca-topk-k32", "pca-topk", 1152, 32, 0.4, 32, 0.9)
    path = results / "builtin-pca-topk-k32" / "core.json"
    core = json.loads(path.read_text())
    core["checkpoint"]["format"] = "builtin"
    path.write_text(json.dumps(core))
    rows = collect_rows([results])
    assert "builtin-pca-topk-k32" in table(rows, sort="core.nmse")  # in the tables, as a control
    text = claims_section(rows)
    assert "builtin-pca-topk-k32" not in text and "left out of the claims" in text


# --- subject-model size -------------------------------------------------------------------------------
def _two_models(tmp_path, large_b, large_c=0.1):
    """One fixed-lr sweep on the default model (width 576) and, same labels, on a wider one (640)."""
    for n in (1024, 2048, 4096, 8192, 16384, 32768):
        for name, width, a, b, c in (
            ("smollm2-135m", 576, 3.0, -0.5, 0.1),
            ("gemma3-270m", 640, 3.0, large_b, large_c),
        ):
            write(
                tmp_path / name,
                f"topk-n{n}-k32",
                "topk",
                n,
                32,
                a * n**b + c,
                32,
                0.0,
                rel=0.005,
                model=(name, width),
            )
    return collect_rows([tmp_path])


def test_rows_of_one_sweep_on_two_subject_models_stay_apart(tmp_path):
    rows = _two_models(tmp_path, -0.3)
    assert len(rows) == 12
    labels = {r.label for r in rows}
    assert "topk-n1024-k32" in labels and "gemma3-270m/topk-n1024-k32" in labels
    assert {r.family for r in rows} == {"topk", "topk on gemma3-270m"}


def test_subject_size_claims_hold_for_a_higher_flatter_law_and_fail_for_the_reverse(tmp_path):
    from saebench.leaderboard.claims import FAILS, HOLDS, measure_subject_exponent, measure_subject_size

    rows = _two_models(tmp_path / "flatter", -0.3)
    (higher,), (flatter,) = measure_subject_size(rows), measure_subject_exponent(rows)
    assert higher.verdict == HOLDS == flatter.verdict
    assert higher.scope.startswith("topk: smollm2-135m (d 576) vs gemma3-270m (d 640)")
    assert "n=1024:" in higher.number and "b = " in flatter.number
    rows = _two_models(tmp_path / "steeper", -0.7)  # the wider model's nmse is lower and falls faster
    assert measure_subject_size(rows)[0].verdict == FAILS == measure_subject_exponent(rows)[0].verdict


def test_subject_size_claims_are_separate_verdicts(tmp_path):
    """The same law shifted up on the wider model: its nmse is higher at every n (holds), but its exponent is
    the same (not separated), which one combined verdict would let the nmse comparisons outvote."""
    from saebench.leaderboard.claims import HOLDS, UNSEPARATED, measure_subject_exponent, measure_subject_size

    rows = _two_models(tmp_path, -0.5, large_c=0.2)
    assert measure_subject_size(rows)[0].verdict == HOLDS
    assert measure_subject_exponent(rows)[0].verdict == UNSEPARATED
