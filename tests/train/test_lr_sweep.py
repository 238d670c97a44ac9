import json
import math
from dataclasses import replace

import pytest

from saebench.context import EvalConfig
from saebench.sae.load import load_sae
from saebench.train.config import TrainConfig
from saebench.train.lr_sweep import (
    FIT_FILE,
    SCORES_FOLDER,
    best_per_n,
    describe,
    finish_lr_sweep,
    fit_sweep,
    fit_trend,
    install_trend,
)
from saebench.train.lr_trend import choose_lr, paper_lr
from saebench.train.presets import LR_FACTORS, LR_SWEEP, PRESETS, SWEEPS, sweep
from saebench.train.runs import train_runs
from saebench.train.trainer import Trainer


def _rows(a, b, ns=(2048, 4096, 8192), factors=(0.25, 0.5, 1, 2, 4), shift=None, activation="topk"):
    """Runs on a grid around a n^b whose delta_ce is a parabola in log lr with its minimum at a n^b
    (times shift[n])."""
    rows = []
    for n in ns:
        best = a * n**b * (shift or {}).get(n, 1.0)
        for f in factors:
            lr = a * n**b * f * 1.1  # the optimum sits between grid points
            rows.append(
                {
                    "name": f"n{n}-lr{lr:.3g}",
                    "activation": activation,
                    "n_latents": n,
                    "k": 32,
                    "lr": lr,
                    "lr_source": "set",
                    "batch_size": 1024,
                    "max_tokens": 490_000,
                    "downstream.delta_ce": 0.2 + 0.05 * math.log(lr / best) ** 2,
                    "core.nmse": 0.3,
                    "core.l0": 32.0,
                }
            )
    return rows


def test_best_lr_per_n_with_bracket_vertex_and_edge_flag():
    rows = _rows(0.5, -0.5, shift={8192: 8.0})  # n=8192's optimum lies beyond the grid's top
    best = {b["n_latents"]: b for b in best_per_n(rows)}
    interior = best[2048]
    assert not interior["at_edge"]
    assert interior["best_lr"] == pytest.approx(0.5 * 2048**-0.5 * 1.1)
    assert interior["bracket"] == pytest.approx([interior["best_lr"] / 2, interior["best_lr"] * 2])
    # the parabola through the best point and its neighbours has its vertex at the true optimum
    assert interior["lr_star"] == pytest.approx(0.5 * 2048**-0.5, rel=1e-6)
    edge = best[8192]
    assert edge["at_edge"] and edge["bracket"][1] is None and edge["lr_star"] == edge["best_lr"]


def test_trend_recovers_the_power_law_and_leaves_out_edge_points():
    trend = fit_trend(best_per_n(_rows(0.3, -0.35, ns=(1024, 2048, 4096, 8192), shift={8192: 8.0})))
    assert trend["b"] == pytest.approx(-0.35, abs=1e-6) and trend["a"] == pytest.approx(0.3, rel=1e-5)
    assert trend["fit_n"] == [1024, 2048, 4096] and not trend["includes_edge"]
    assert fit_trend(best_per_n(_rows(0.3, -0.35, ns=(4096,))))["a"] is None


def test_lr_sweep_preset_grid_spans_8x_around_5_7x_the_paper_rule():
    names = SWEEPS[LR_SWEEP]
    assert len(names) == 4 * len(LR_FACTORS) == 20
    for n in (2048, 4096, 8192, 16384):
        lrs = sorted(PRESETS[p].lr for p in names if PRESETS[p].n_latents == n)
        assert lrs[-1] / lrs[0] == pytest.approx(8, rel=0.01)
        assert math.sqrt(lrs[0] * lrs[-1]) == pytest.approx(2**2.5 * paper_lr(n), rel=0.01)
        assert {PRESETS[p].k for p in names} == {32}


def test_relu_trend_is_filed_beside_topk_and_chooses_the_relu_runs_lr(tmp_path):
    path = _trend_file(tmp_path)
    topk = _topk_trend(path)
    relu_rows = _rows(0.1, -0.3, ns=(2048, 4096), activation="relu")
    fit = fit_sweep(relu_rows, sweep="relu-lr", out=tmp_path, n_tokens=500_000, eval_tokens=100)
    assert fit["activation"] == "relu" and "L0 target 32" in describe(fit) and "L0 32.0" in describe(fit)
    install_trend(fit, path)
    trends = json.loads(path.read_text())["trends"]
    assert set(trends) == {"relu", "topk"} and trends["topk"] == topk
    relu = TrainConfig(activation="relu", n_latents=4096, batch_size=1024, max_tokens=400_000)
    lr, source = choose_lr(relu, path)
    assert lr == pytest.approx(trends["relu"]["a"] * 4096 ** trends["relu"]["b"])
    assert (
        source == f"trend {path} (fit {trends['relu']['fit_id']})" != f"trend {path} (fit {topk['fit_id']})"
    )
    assert lr == pytest.approx(0.1 * 4096**-0.3, rel=1e-4) != pytest.approx(paper_lr(4096))
    topk_lr, _ = choose_lr(TrainConfig(n_latents=4096, batch_size=1024, max_tokens=400_000), path)
    assert topk_lr == pytest.approx(topk["a"] * 4096 ** topk["b"])
    with pytest.raises(ValueError, match="differ in activation"):
        fit_sweep(relu_rows + _rows(0.1, -0.3), sweep="x", out=tmp_path, n_tokens=1, eval_tokens=1)
    path.write_text(json.dumps({"a": 1.0}))  # a file in no known shape: one line saying what to do
    with pytest.raises(ValueError, match="regenerate it from an lr sweep"):
        choose_lr(relu, path)


def test_relu_lr_sweep_searches_lambda_at_each_lr_of_a_16x_grid():
    names = SWEEPS["relu-lr"]
    assert len(names) == 10
    for n in (2048, 4096):
        configs = [PRESETS[p] for p in names if PRESETS[p].n_latents == n]
        lrs = sorted(c.lr for c in configs)
        assert lrs[0] == pytest.approx(paper_lr(n), rel=0.01) and lrs[-1] / lrs[0] == pytest.approx(
            16, rel=0.01
        )
        assert {(c.activation, c.l1_target_l0, c.k) for c in configs} == {("relu", 32, 32)}


def _trend_file(tmp_path, **changes):
    fit = fit_sweep(_rows(0.4, -0.5), sweep="lr", out=tmp_path, n_tokens=500_000, eval_tokens=100)
    fit.update(changes)
    return install_trend(fit, tmp_path / "trend.json")


def _topk_trend(path) -> dict:
    return json.loads(path.read_text())["trends"]["topk"]


def test_lr_choice_set_trend_and_paper_rule(tmp_path, monkeypatch):
    path = _trend_file(tmp_path)
    trend = _topk_trend(path)
    like_the_sweep = TrainConfig(n_latents=4096, batch_size=1024, max_tokens=400_000)
    lr, source = choose_lr(like_the_sweep, path)
    assert lr == pytest.approx(trend["a"] * 4096 ** trend["b"]) and lr != pytest.approx(paper_lr(4096))
    assert source == f"trend {path} (fit {trend['fit_id']})"
    assert choose_lr(TrainConfig(lr=1e-3, batch_size=1024, max_tokens=400_000), path) == (1e-3, "set")
    for config, reason in (
        (TrainConfig(n_latents=4096, batch_size=4096, max_tokens=400_000), "fitted at batch 1024, not 4096"),
        (TrainConfig(n_latents=4096, batch_size=1024, max_tokens=2_000_000), "fitted at 490000 tokens"),
        (TrainConfig(n_latents=4096, batch_size=1024, activation="relu", max_tokens=400_000), "no relu fit"),
    ):
        lr, source = choose_lr(config, path)
        assert lr == paper_lr(4096) and source.startswith("paper rule (trend") and reason in source
    # the trend in force comes from $SAEBENCH_LR_TREND (the autouse fixture sets `none`)
    assert like_the_sweep.lr_choice() == (paper_lr(4096), "paper rule")
    monkeypatch.setenv("SAEBENCH_LR_TREND", str(path))
    assert like_the_sweep.effective_lr() == pytest.approx(trend["a"] * 4096 ** trend["b"])


def test_fixed_lr_sweep_holds_every_n_at_the_lr_of_the_smallest_n(tmp_path, monkeypatch):
    path = _trend_file(tmp_path)
    trend = _topk_trend(path)
    configs = sweep("fixed-lr", batch_size=1024, max_tokens=400_000)
    assert {c.lr_at_n for c in configs.values()} == {2048} and {c.lr for c in configs.values()} == {None}
    monkeypatch.setenv("SAEBENCH_LR_TREND", str(path))
    for config in configs.values():
        lr, source = config.lr_choice()
        assert lr == pytest.approx(trend["a"] * 2048 ** trend["b"]) and source.endswith(" at n=2048")
    monkeypatch.setenv("SAEBENCH_LR_TREND", "none")
    big = configs["topk-n16384-k32-fixedlr"]
    assert big.lr_choice() == (paper_lr(2048), "paper rule at n=2048") and paper_lr(2048) != paper_lr(16384)
    with pytest.raises(ValueError, match="lr_at_n"):
        TrainConfig(lr_at_n=0)


def test_tiny_lr_sweep_scores_fits_resumes_and_its_trend_trains_the_next_run(
    make_context, tmp_path, monkeypatch
):
    context = make_context()
    base = dict(k=2, batch_size=64, geometric_median_tokens=128, checkpoint_every=0)
    configs = {
        f"n{n}-lr{lr:g}": TrainConfig(n_latents=n, lr=lr, **base) for n in (16, 32) for lr in (3e-3, 3e-2)
    }
    out = tmp_path / "sweep"
    done = train_runs(context.site, configs, out, n_tokens=400)
    fit = finish_lr_sweep(context.site, done, out, sweep="tiny", n_tokens=400, eval_tokens=90)
    assert json.loads((out / FIT_FILE).read_text()) == json.loads(json.dumps(fit))
    assert len(fit["runs"]) == 4 and [b["n_latents"] for b in fit["best"]] == [16, 32]
    for row in fit["runs"]:
        scores = out / row["name"] / SCORES_FOLDER
        assert (scores / "core.json").is_file() and (scores / "downstream.json").is_file()
        core = json.loads((scores / "core.json").read_text())
        assert core["values"]["nmse"]["value"] == row["core.nmse"] and row["lr_source"] == "set"
        assert core["eval"]["eval_split"] == "eval"  # held out, although the corpus is the user's
        # this corpus has no windows after the default evaluation set: scored on the evaluation set
        assert core["eval"]["eval_start"] == 0
    for b in fit["best"]:
        runs = [r for r in fit["runs"] if r["n_latents"] == b["n_latents"]]
        assert b["best"] == min(r["downstream.delta_ce"] for r in runs)
    # a second pass trains and scores nothing again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != FIT_FILE}
    done = train_runs(context.site, configs, out, n_tokens=400)
    again = finish_lr_sweep(context.site, done, out, sweep="tiny", n_tokens=400, eval_tokens=90)
    assert again["fit_id"] == fit["fit_id"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != FIT_FILE} == before

    # the installed trend chooses the lr of a run that leaves it unset, and the checkpoint says so
    fit["trend"].update(a=0.02, b=-0.25)  # a trend whose lr differs from the paper's rule at n=24
    trend = install_trend(fit, tmp_path / "lr_trend.json")
    monkeypatch.setenv("SAEBENCH_LR_TREND", str(trend))
    (path,) = train_runs(context.site, {"next": TrainConfig(n_latents=24, **base)}, tmp_path / "next", 400)
    training = load_sae(path).info.extra["training"]
    assert training["lr"] == pytest.approx(0.02 * 24**-0.25)
    assert training["lr_source"] == f"trend {trend} (fit {fit['fit_id']})"
    assert training["config"]["lr"] is None


def test_the_sweep_validates_on_the_windows_after_the_evaluation_set(make_context):
    from saebench.train.lr_sweep import validation_config

    site = make_context().site
    held_out = validation_config(site, 90)
    default = EvalConfig(**{**site.config.__dict__, "layer": site.layer})
    assert held_out.eval_start == default.n_windows > 0 and held_out.n_tokens == 90


def test_resumed_run_keeps_its_lr_when_the_trend_changes(tmp_path, monkeypatch, planted):
    path = _trend_file(tmp_path)
    monkeypatch.setenv("SAEBENCH_LR_TREND", str(path))
    config = TrainConfig(n_latents=48, k=4, batch_size=1024, max_tokens=490_000, geometric_median_tokens=256)
    trainer = Trainer(config, 24, out_dir=tmp_path / "run")
    trainer.initialize(planted(1, 256)[0])
    trainer.save_checkpoint()
    monkeypatch.setenv("SAEBENCH_LR_TREND", "none")
    resumed = Trainer.resume(tmp_path / "run")
    assert (resumed.lr, resumed.lr_source) == (trainer.lr, trainer.lr_source)
    assert resumed.optimizer.param_groups[0]["lr"] == trainer.lr != paper_lr(48)
    assert resumed.provenance()["lr_source"].startswith("trend ")


def test_dead_latents_sweep_differs_from_the_recipe_only_in_its_mitigations():
    arms = sweep("dead-latents")
    recipe, *variants = arms.values()
    assert recipe.auxk_alpha is None and recipe.tied_init and recipe.lr is not None
    for config in variants:
        assert config.auxk_alpha == 0.0
        assert replace(config, auxk_alpha=None, tied_init=True) == recipe
    assert [c.tied_init for c in variants] == [True, False]


def test_the_packaged_trend_is_named_by_its_place_in_the_package_not_this_checkout(monkeypatch):
    from saebench.train.lr_trend import TREND_FILE

    monkeypatch.delenv("SAEBENCH_LR_TREND")
    config = TrainConfig(n_latents=4096, batch_size=1024, max_tokens=497_012)
    _, source = choose_lr(config)
    assert TREND_FILE.is_file() and source.startswith("trend saebench/train/lr_trend.json (fit ")
    assert str(TREND_FILE.parent) not in source
