import json

import pytest
import torch

from saebench.cli import main
from saebench.sae.formats.native import save_native
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
