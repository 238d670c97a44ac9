import json
import shutil

import pytest
import torch

from saebench.cli import main
from saebench.sae.formats.native import save_native
from tests.bad_inputs import CASES
from tests.conftest import random_sae


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama.hf_model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    return folder


def run(args, tmp_path, corpus_file, model_folder):
    return main(
        [
            "run",
            *args,
            "--model",
            str(model_folder),
            "--layer",
            "1",
            "--corpus",
            str(corpus_file),
            "--n-tokens",
            "90",
            "--ctx",
            "16",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )


def test_run_folder_of_checkpoints(tmp_path, corpus_file, model_folder, capsys):
    runs = tmp_path / "runs"
    save_native(random_sae(64, 96, k=4, seed=1), runs / "a")
    save_native(random_sae(64, 128, k=8, seed=2), runs / "b")
    assert run(["--checkpoint", str(runs)], tmp_path, corpus_file, model_folder) == 0
    out = capsys.readouterr().out
    assert "| a " in out and "| b " in out and "delta_ce" in out
    for label, n in (("a", 96), ("b", 128)):
        core = json.loads((tmp_path / "out" / label / "core.json").read_text())
        assert core["checkpoint"]["n_latents"] == n and core["checkpoint"]["format"] == "native"
        assert (tmp_path / "out" / label / "downstream.json").exists()


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saebench: error:")]
    assert len(err) == 1
    return err[0]


def test_missing_checkpoint(tmp_path, corpus_file, model_folder, capsys):
    assert run(["--checkpoint", str(tmp_path / "nope")], tmp_path, corpus_file, model_folder) == 2
    assert "nope" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_width_mismatch_and_nan_weights_leave_no_results(tmp_path, corpus_file, model_folder, capsys):
    save_native(random_sae(32, 64, k=4), tmp_path / "narrow")
    assert run(["--checkpoint", str(tmp_path / "narrow")], tmp_path, corpus_file, model_folder) == 2
    assert "32" in one_line_error(capsys)
    bad = random_sae(64, 64, k=4)
    with torch.no_grad():
        bad.W_dec[3, 5] = float("nan")
    save_native(bad, tmp_path / "nan")
    assert run(["--checkpoint", str(tmp_path / "nan")], tmp_path, corpus_file, model_folder) == 2
    assert "nan" in one_line_error(capsys).lower()
    assert not list((tmp_path / "out").rglob("*.json")) if (tmp_path / "out").exists() else True


def test_unknown_metric(tmp_path, corpus_file, model_folder, capsys):
    assert (
        run(
            ["--checkpoint", "builtin:pca-topk", "--tasks", "core,bogus"], tmp_path, corpus_file, model_folder
        )
        == 2
    )
    message = one_line_error(capsys)
    assert "not a metric (core, downstream" in message and "'bogus'" in message


def test_train_rejects_unknown_preset_and_bad_override(capsys):
    assert main(["train", "--preset", "topk-n3-k1"]) == 2
    assert "unknown preset 'topk-n3-k1'" in one_line_error(capsys)
    assert main(["train", "--preset", "topk-n2048-k16", "--set", "nonsense=1"]) == 2
    assert "bad --set 'nonsense=1'" in one_line_error(capsys)
    assert main(["train", "--preset", "topk-n2048-k16", "--sweep", "baseline"]) == 2
    assert "exactly one of --preset" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("core.dense_threshold=abc", "bad --param 'core.dense_threshold=abc': expected a float"),
        ("probes.max_iter=2.5", "bad --param 'probes.max_iter=2.5': expected an integer"),
        ("probes.nonsense=1", "metric 'probes' has no parameter 'nonsense'; it has: tasks, include_tasks"),
        ("bogus.x=1", "bad --param 'bogus.x=1': no metric 'bogus'; metrics: core, downstream"),
        ("dense_threshold=0.5", "bad --param 'dense_threshold=0.5': use METRIC.NAME=VALUE"),
        ("core.dense_threshold=2", "core: dense_threshold is a fraction in (0, 1], got 2.0"),
        ("probes.fit_dtype=float16", "probes: fit_dtype must be one of float32, float64, got 'float16'"),
    ],
)
def test_bad_param_is_one_line_error_before_any_work(param, message, tmp_path, capsys):
    args = ["run", "--checkpoint", "builtin:pca-topk", "--param", param, "--out", str(tmp_path / "out")]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_bad_set_is_one_line_error(capsys):
    for item, message in (
        ("multi_topk=maybe", "bad --set 'multi_topk=maybe': expected a boolean"),
        ("lr=fast", "bad --set 'lr=fast': expected a float or none"),
        ("lr=0", "lr must be positive"),
        ("batch_szie=8", "TrainConfig has no parameter 'batch_szie' (did you mean 'batch_size'?)"),
    ):
        assert main(["train", "--preset", "topk-n2048-k16", "--set", item]) == 2
        assert message in one_line_error(capsys)


def test_lr_sweep_refuses_overrides_of_what_it_sweeps(tmp_path, capsys):
    for sweep, item in (
        ("lr", "lr=1e-3"),
        ("lr", "n_latents=64"),
        ("lr", "k=8"),
        ("relu-lr", "l1_target_l0=8"),
    ):
        argv = ["train", "--sweep", sweep, "--set", item, "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        assert f"--sweep {sweep} sets lr, n_latents, k and l1_target_l0 itself" in one_line_error(capsys)
    assert main(["train", "--sweep", "baseline", "--install-trend", "--out", str(tmp_path / "out")]) == 2
    assert "--install-trend installs the fit of an lr sweep (lr or relu-lr)" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_help_lists_every_parameter_with_type_default_and_doc(capsys):
    import dataclasses

    from saebench.metrics.registry import get_metric, metric_names
    from saebench.params import field_docs
    from saebench.train.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "  dense_threshold: float = 0.1\n      a latent active on more than this fraction" in text
    assert "  fit_dtype: str = 'float32'\n" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_text = capsys.readouterr().out
    assert "  multi_topk: bool = False\n      Add Multi-TopK's term" in train_text
    assert "  lr: float | None = None\n" in train_text
    for cls, shown in [*((get_metric(n).params, text) for n in metric_names()), (TrainConfig, train_text)]:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f"  {f.name}: " in shown and docs[f.name].split()[0] in shown, (cls, f.name)


def test_train_set_overrides_reach_the_checkpoint_provenance(tmp_path, corpus_file, model_folder):
    sets = ["n_latents=64", "k=4", "batch_size=64", "geometric_median_tokens=128", "checkpoint_every=0"]
    sets += ["tied_init=false", "lr=1e-3", "k_aux=none", "log_every=5"]
    args = ["train", "--preset", "topk-n2048-k16", "--n-tokens", "600", "--out", str(tmp_path / "runs")]
    args += ["--model", str(model_folder), "--layer", "1", "--corpus", str(corpus_file), "--ctx", "16"]
    args += ["--cache-dir", str(tmp_path / "cache"), *(x for s in sets for x in ("--set", s))]
    assert main(args) == 0
    cfg = json.loads((tmp_path / "runs" / "topk-n2048-k16" / "sae" / "cfg.json").read_text())
    config = cfg["training"]["config"]
    assert config["tied_init"] is False and config["k_aux"] is None and config["lr"] == 1e-3
    assert (config["n_latents"], config["k"], config["batch_size"], config["log_every"]) == (64, 4, 64, 5)
    assert config["device"] == "cpu" and config["auxk_alpha"] is None
    assert (cfg["training"]["lr"], cfg["training"]["lr_source"]) == (1e-3, "set")


def test_only_trains_the_matching_presets_of_a_sweep(tmp_path, corpus_file, model_folder):
    sets = ["n_latents=64", "k=4", "batch_size=64", "geometric_median_tokens=128", "checkpoint_every=0"]
    args = ["train", "--sweep", "fixed-lr", "--only", "*-n2048-k16-*", "--only", "*-n4096-k64-*"]
    args += ["--n-tokens", "300", "--out", str(tmp_path / "runs"), "--model", str(model_folder)]
    args += ["--layer", "1", "--corpus", str(corpus_file), "--ctx", "16"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    trained = sorted(p.name for p in (tmp_path / "runs").iterdir() if (p / "sae" / "cfg.json").is_file())
    assert trained == ["topk-n2048-k16-fixedlr", "topk-n4096-k64-fixedlr"]


@pytest.fixture(scope="module")
def bad_input_paths(tmp_path_factory):
    from tests.bad_inputs import prepare

    return prepare(tmp_path_factory.mktemp("bad-inputs"))


def _case_id(case) -> str:
    return " ".join(case[0])[:80] or "(no arguments)"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_one_line_error_and_writes_nothing(case, bad_input_paths, capsys):
    from tests.bad_inputs import expand

    argv, fragment = case
    argv, fragment = expand(argv, bad_input_paths), expand([fragment], bad_input_paths)[0]
    out = bad_input_paths["out"]
    assert not out.exists()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors exit from inside main
        code = exit_.code
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("saebench: error:"), err
    assert fragment in err and "Traceback" not in err
    written = list(out.rglob("*")) if out.exists() else []
    shutil.rmtree(out, ignore_errors=True)  # the next case starts without it, whatever happened here
    assert not written
    assert bad_input_paths["file"].read_text() == "a plain file\n"


def test_folder_run_evaluates_what_it_can_and_lists_each_failure(
    tmp_path, corpus_file, model_folder, capsys, monkeypatch
):
    import saebench.model

    real_load = saebench.model.load_model

    def offline_load(name, **kw):
        if name == "openai-community/gpt2":  # a hub model that is not cached on this machine
            raise saebench.model.loading.ModelLoadError(
                f"cannot load model {name!r} as a Hugging Face hub id"
            )
        return real_load(name, **kw)

    monkeypatch.setattr(saebench.model, "load_model", offline_load)
    runs = tmp_path / "runs"
    for name, d, seed in (("a", 64, 1), ("b-narrow", 32, 2), ("c", 64, 3), ("d-hub", 64, 4)):
        save_native(random_sae(d, 96, k=4, seed=seed), runs / name)
    for name, model in (
        ("a", str(model_folder)),
        ("c", str(model_folder)),
        ("d-hub", "openai-community/gpt2"),
    ):
        cfg = json.loads((runs / name / "cfg.json").read_text())
        (runs / name / "cfg.json").write_text(json.dumps({**cfg, "model_name": model, "layer": 1}))
    args = ["run", "--checkpoint", str(runs), "--tasks", "core", "--corpus", str(corpus_file)]
    args += [
        "--n-tokens",
        "90",
        "--ctx",
        "16",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert sorted(p.parent.name for p in (tmp_path / "out").rglob("core.json")) == ["a", "c"]
    assert "| a " in captured.out and "| c " in captured.out and "b-narrow" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("saebench: error:")]
    assert len(errors) == 2
    assert errors[0].startswith(
        f"saebench: error: checkpoint b-narrow ({runs / 'b-narrow'}): SAE input width"
    )
    assert "evaluate it on the model it was trained on" in errors[0]
    assert errors[1].startswith(
        f"saebench: error: checkpoint d-hub ({runs / 'd-hub'}): its config names model"
    )
    assert errors[1].endswith("pass --model smollm2-135m (or another model of width 64)")
    assert captured.err.rstrip().endswith("saebench: 2 of 4 checkpoints failed (listed above)")


def _core_run(checkpoint, tmp_path, corpus_file, model_folder, *extra):
    args = ["run", "--checkpoint", str(checkpoint), "--tasks", "core", *extra]
    return run(args[1:], tmp_path, corpus_file, model_folder)


def test_two_checkpoints_with_one_name_never_overwrite_each_other(
    tmp_path, corpus_file, model_folder, capsys
):
    first, second = tmp_path / "runs" / "a" / "topk-n96-k4", tmp_path / "runs" / "b" / "topk-n96-k4"
    save_native(random_sae(64, 96, k=4, seed=1), first)
    save_native(random_sae(64, 96, k=4, seed=2), second)
    core = tmp_path / "out" / "topk-n96-k4" / "core.json"
    assert _core_run(first, tmp_path, corpus_file, model_folder) == 0
    kept, mtime = core.read_bytes(), core.stat().st_mtime_ns
    capsys.readouterr()

    assert _core_run(second, tmp_path, corpus_file, model_folder) == 2
    message = one_line_error(capsys)
    assert "already holds results of another checkpoint" in message and "pass --label NAME" in message
    assert _core_run(second, tmp_path, corpus_file, model_folder, "--force") == 2  # --force recomputes, only
    assert "already holds results of another checkpoint" in one_line_error(capsys)
    assert core.read_bytes() == kept

    assert _core_run(second, tmp_path, corpus_file, model_folder, "--label", "topk-n96-k4-b") == 0
    relabelled = json.loads((tmp_path / "out" / "topk-n96-k4-b" / "core.json").read_text())
    assert relabelled["checkpoint"]["label"] == "topk-n96-k4-b"
    assert relabelled["checkpoint"]["sha256"] != json.loads(kept)["checkpoint"]["sha256"]

    # the same checkpoint again, from its own path or a copy elsewhere: its file is reused, not recomputed
    shutil.copytree(first, tmp_path / "copy" / "topk-n96-k4")
    for same in (first, tmp_path / "copy" / "topk-n96-k4"):
        assert _core_run(same, tmp_path, corpus_file, model_folder) == 0
        assert core.read_bytes() == kept and core.stat().st_mtime_ns == mtime


def test_folder_run_refuses_a_label_holding_another_checkpoint(tmp_path, corpus_file, model_folder, capsys):
    save_native(random_sae(64, 96, k=4, seed=1), tmp_path / "elsewhere" / "a")
    assert _core_run(tmp_path / "elsewhere" / "a", tmp_path, corpus_file, model_folder) == 0
    kept = (tmp_path / "out" / "a" / "core.json").read_bytes()
    for name, seed in (("a", 2), ("b", 3)):
        save_native(random_sae(64, 96, k=4, seed=seed), tmp_path / "runs" / name)
    assert _core_run(tmp_path / "runs", tmp_path, corpus_file, model_folder) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saebench: error:")]
    assert (
        len(errors) == 1
        and "checkpoint a " in errors[0]
        and "evaluate it alone with --label NAME" in errors[0]
    )
    assert (tmp_path / "out" / "a" / "core.json").read_bytes() == kept
    assert (tmp_path / "out" / "b" / "core.json").exists()


def test_terminal_summary_fits_100_columns(tmp_path, corpus_file, model_folder, capsys):
    runs = tmp_path / "runs"
    for name, seed in (("topk-n96-k4-a-rather-long-checkpoint-name", 1), ("b", 2), ("c", 3)):
        save_native(random_sae(64, 96, k=4, seed=seed), runs / name / "sae")
    assert run(["--checkpoint", str(runs)], tmp_path, corpus_file, model_folder) == 0
    out = capsys.readouterr().out
    table = out.split("\nresults:")[0].splitlines()
    assert max(map(len, table)) <= 100 and "core\n| checkpoint " in out and "| nmse " in out
    assert (
        "\ndownstream\n| checkpoint " in out and "| delta_ce " in out and "`saebench run --wide` shows" in out
    )
    assert run(["--checkpoint", str(runs), "--wide"], tmp_path, corpus_file, model_folder) == 0
    wide = capsys.readouterr().out
    assert max(map(len, wide.splitlines())) > 100 and "downstream.loss_recovered" in wide
    assert run(["--checkpoint", str(runs / "b")], tmp_path, corpus_file, model_folder) == 0
    single = capsys.readouterr().out.split("\nresults:")[0].splitlines()
    assert max(map(len, single)) <= 100
    assert single[0] == "checkpoint b"
    assert single[1].replace(" ", "") == "|metric|value|estimate[95%interval]|n|"
    rows = {line.split("|")[2].strip(): line for line in single[3:]}
    assert set(rows) == {"nmse", "l0", "dead_frac", "fvu_raw", "dense_frac", "norm_ratio"} | {
        "delta_ce",
        "kl",
        "loss_recovered",
        "ce_spliced",
        "ce_clean",
        "ce_zero",
    }
    assert rows["dead_frac"].split("|")[4].strip() == "96 latents"
