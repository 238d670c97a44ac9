import json

import pytest

from saebench.runner import RunConfig, Runner
from saebench.summary import summary_table
from tests.conftest import tiny_eval_config


def make_runner(tmp_path, corpus_file, model, checkpoint, metrics=("core", "downstream"), **kw):
    cfg = RunConfig(
        checkpoint=checkpoint,
        metrics=list(metrics),
        eval=tiny_eval_config(tmp_path, corpus_file, n_tokens=8 * 15, batch_size=4),
        out=str(tmp_path / "results"),
        **kw,
    )
    return Runner(cfg, model=model)


def test_builtin_pca_with_k_equal_d_is_exact(tmp_path, corpus_file, tiny_llama):
    d = tiny_llama.d_model
    results = make_runner(tmp_path, corpus_file, tiny_llama, f"builtin:pca-topk:k={d},fit_tokens=1500").run()
    core = next(r for r in results if r["metric"] == "core")
    down = next(r for r in results if r["metric"] == "downstream")
    assert core["values"]["nmse"]["value"] < 1e-6
    assert abs(down["values"]["delta_ce"]["value"]) < 1e-4


def test_pca_beats_random_at_equal_k(tmp_path, corpus_file, tiny_llama):
    pca = make_runner(
        tmp_path, corpus_file, tiny_llama, "builtin:pca-topk:k=4,fit_tokens=1500", metrics=["core"]
    ).run()
    rnd = make_runner(
        tmp_path, corpus_file, tiny_llama, "builtin:random-topk:k=4,n=128,fit_tokens=1500", metrics=["core"]
    ).run()
    assert pca[0]["values"]["nmse"]["value"] < rnd[0]["values"]["nmse"]["value"]
    assert pca[0]["values"]["l0"]["value"] <= 4


def test_result_files_reused_and_forced(tmp_path, corpus_file, tiny_llama):
    runner = make_runner(
        tmp_path, corpus_file, tiny_llama, "builtin:pca-topk:k=4,fit_tokens=1500", metrics=["core"]
    )
    first = runner.run()[0]
    path = tmp_path / "results" / first["checkpoint"]["label"] / "core.json"
    saved = json.loads(path.read_text())
    assert saved["key"] == first["key"]
    for field in ("checkpoint", "config", "eval", "data_key", "provenance", "counts"):
        assert field in saved
    assert saved["checkpoint"]["sha256"] and saved["eval"]["layer"] == 1
    mtime = path.stat().st_mtime_ns
    make_runner(
        tmp_path, corpus_file, tiny_llama, "builtin:pca-topk:k=4,fit_tokens=1500", metrics=["core"]
    ).run()
    assert path.stat().st_mtime_ns == mtime
    make_runner(
        tmp_path,
        corpus_file,
        tiny_llama,
        "builtin:pca-topk:k=4,fit_tokens=1500",
        metrics=["core"],
        force=True,
    ).run()
    assert path.stat().st_mtime_ns != mtime
    table = summary_table([saved])
    assert "nmse" in table and first["checkpoint"]["label"] in table


def test_changed_parameter_is_a_new_result(tmp_path, corpus_file, tiny_llama):
    a = make_runner(
        tmp_path, corpus_file, tiny_llama, "builtin:pca-topk:k=4,fit_tokens=1500", metrics=["core"]
    ).run()[0]
    b = make_runner(
        tmp_path,
        corpus_file,
        tiny_llama,
        "builtin:pca-topk:k=4,fit_tokens=1500",
        metrics=["core"],
        params={"core": {"dense_threshold": "0.5"}},
    ).run()[0]
    assert a["key"] != b["key"] and b["config"]["dense_threshold"] == 0.5


def test_unknown_parameter_and_builtin_errors(tmp_path, corpus_file, tiny_llama):
    with pytest.raises(ValueError, match="has no parameter 'nope'"):
        make_runner(
            tmp_path,
            corpus_file,
            tiny_llama,
            "builtin:pca-topk:fit_tokens=1500",
            metrics=["core"],
            params={"core": {"nope": "1"}},
        ).run()
    with pytest.raises(ValueError, match="unknown built-in baseline"):
        make_runner(tmp_path, corpus_file, tiny_llama, "builtin:kmeans").run()


def test_labels_of_trainer_run_folders(tmp_path):
    from saebench.runner import discover
    from saebench.sae.formats.native import save_native
    from tests.conftest import random_sae

    for run in ("topk-a", "topk-b"):
        save_native(random_sae(16, 32, k=2), tmp_path / "runs" / run / "sae")
    assert [c.label for c in discover(str(tmp_path / "runs"))] == ["topk-a", "topk-b"]


def test_tasks_option_mixes_metrics_and_probe_tasks():
    from saebench.metrics.registry import metric_names
    from saebench.runner import parse_metrics

    everything, implied = parse_metrics("all")
    assert everything == metric_names() and everything[:3] == ["core", "downstream", "probes"]
    assert implied == {}
    assert parse_metrics("downstream,core") == (["core", "downstream"], {})
    assert parse_metrics("core,code,21_headline_istrump") == (
        ["core", "probes"],
        {"probes": {"tasks": "code,21_headline_istrump"}},
    )
    with pytest.raises(ValueError, match="not a metric"):
        parse_metrics("core,nonsense")


def test_builtin_rerun_at_another_site_is_the_same_checkpoint(tmp_path, corpus_file, tiny_llama):
    import dataclasses

    runner = make_runner(
        tmp_path, corpus_file, tiny_llama, "builtin:pca-topk:k=4,fit_tokens=600", metrics=["core"]
    )
    first = runner.run()[0]
    runner.config.eval = dataclasses.replace(runner.config.eval, layer=2)
    runner.contexts.clear()
    second = runner.run()[0]  # refitted at layer 2 and filed under the same label, not refused
    assert second["eval"]["layer"] == 2 and second["checkpoint"]["label"] == first["checkpoint"]["label"]
    assert second["checkpoint"]["sha256"] != first["checkpoint"]["sha256"]
    other = make_runner(
        tmp_path, corpus_file, tiny_llama, "builtin:pca-topk:k=4,fit_tokens=700", metrics=["core"]
    )
    with pytest.raises(ValueError, match="already holds results of another checkpoint"):
        other.run()  # another spec that happens to share the label (fit_tokens is not in it)


def _result(label, metric, values, headline):
    estimate = {"value": -0.012345678, "lo": -0.0345678, "hi": 0.0234567, "n": 16384, "unit": "windows"}
    return {
        "metric": metric,
        "checkpoint": {"label": label},
        "headline": headline,
        "values": {name: estimate for name in values},
    }


def test_summary_fits_100_columns_and_wide_shows_everything():
    metrics = {
        "core": ["nmse", "l0", "dead_frac", "fvu_raw", "dense_frac", "norm_ratio"],
        "downstream": ["delta_ce", "kl", "loss_recovered"],
        "probes": ["probe_loss", "probe_loss_residual", "probe_loss_prior"],
    }
    labels = ["topk-n16384-k64__a-very-long-run-name-indeed__sae", "relu-n2048-l016", "builtin-pca-topk-k32"]
    results = [_result(label, m, names, names) for label in labels for m, names in metrics.items()]
    text = summary_table(results)
    assert max(map(len, text.splitlines())) <= 100
    blocks = text.split("\n\n")
    assert [b.splitlines()[0] for b in blocks[:3]] == list(metrics)
    for block, names in zip(blocks[:3], metrics.values(), strict=True):
        header = [h.strip() for h in block.splitlines()[1].strip("|").split("|")]
        assert header == ["checkpoint", *names[:2]]  # the first headline values, as many as fit
        assert len(block.splitlines()) == 2 + 1 + len(labels)
    assert (
        blocks[3]
        == "6 of 12 headline values shown; `saebench run --wide` shows them all, the result files every value"
    )
    wide = summary_table(results, wide=True)
    assert all(f"{m}.{n}" in wide for m, names in metrics.items() for n in names)
    assert labels[0] in wide and max(map(len, wide.splitlines())) > 100
    single = summary_table(results[:3]).splitlines()
    assert max(map(len, single)) <= 100 and len(single) == 1 + 2 + 12
    assert single[0] == f"checkpoint {labels[0]}"
    assert [c.strip() for c in single[3].strip("|").split("|")] == [
        "core",
        "nmse",
        "-0.01235 [-0.03457, 0.02346]",
        "16384 windows",
    ]
