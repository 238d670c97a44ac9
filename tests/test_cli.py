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
