"""benchmarks/sparsify_vs_saebench.py on the tiny model: both trainers on one stream, scored by the runner."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from saebench.sae.load import load_sae
from tests.requires import module

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "sparsify_vs_saebench.py"


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    module("sparsify", "make setup-peers")
    spec = importlib.util.spec_from_file_location("sparsify_vs_saebench", BENCHMARK)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_both_trainers_on_one_stream_scored_alike(benchmark, tmp_path, corpus_file, tiny_llama, capsys):
    model = tmp_path / "model"
    tiny_llama.hf_model.save_pretrained(model)
    tiny_llama.tokenizer.save_pretrained(model)
    argv = ["--model", str(model), "--layer", "1", "--corpus", str(corpus_file), "--ctx", "16"]
    argv += ["--n-tokens", "400", "--n", "32", "--k", "4", "--batch", "64", "--eval-tokens", "90"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert benchmark.main(argv) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out" / "n32-k4-b64-t400"
    rows = json.loads((out / "comparison.json").read_text())
    ours, theirs = rows["saebench"], rows["sparsify"]
    assert ours["tokens"] == theirs["tokens"] > 300  # the same stream, to its end
    assert theirs["lr"] == pytest.approx(5e-3 / math.sqrt(32 / 2**14)) and ours["lr_source"] == "paper rule"
    with pytest.warns(UserWarning, match="not unit norm"):  # sparsify saves the schedule-free average
        sae = load_sae(out / "sparsify" / "layers.1")
    assert sae.info.format == "sparsify" and sae.n_latents == 32 and sae.k == 4
    assert load_sae(out / "saebench" / "sae").normalization.kind == "layer_norm"
    # sparsify's SAE sees raw inputs: its nmse (in its input space) is its fvu_raw
    assert theirs["core.nmse"] == pytest.approx(theirs["core.fvu_raw"], rel=1e-4)
    for trainer, row in rows.items():
        downstream = json.loads((out / "scores" / trainer / "downstream.json").read_text())
        assert downstream["values"]["delta_ce"]["value"] == row["downstream.delta_ce"]
        assert f"{row['downstream.delta_ce']:>10.4f}" in printed
    # a rerun reuses both checkpoints
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert benchmark.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
