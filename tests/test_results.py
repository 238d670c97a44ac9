import json

import pandas as pd
import pytest

from saebench.results import RESULT_COLUMNS, load_results
from saebench.runner import RunConfig, Runner
from saebench.sae.formats.native import save_native
from tests.conftest import random_sae, tiny_eval_config, write_corpus


@pytest.fixture(scope="module")
def results_folder(tmp_path_factory, tiny_llama):
    """Result files of two checkpoints (core + downstream), one trained with a training record."""
    tmp_path = tmp_path_factory.mktemp("results")
    corpus_file = write_corpus(tmp_path / "corpus.txt")
    save_native(random_sae(64, 96, k=4, seed=1), tmp_path / "runs" / "a")
    training = {"tokens_seen": 4321, "variant": "no AuxK"}
    save_native(random_sae(64, 128, k=8, seed=2), tmp_path / "runs" / "b", training=training)
    config = RunConfig(
        checkpoint=str(tmp_path / "runs"),
        metrics=["core", "downstream"],
        eval=tiny_eval_config(tmp_path, corpus_file),
        out=str(tmp_path / "results"),
    )
    Runner(config, model=tiny_llama).run()
    return tmp_path / "results"


def test_one_row_per_checkpoint_metric_and_value(results_folder):
    frame = load_results(results_folder)
    assert list(frame.columns) == list(RESULT_COLUMNS)
    files = sorted(results_folder.rglob("*.json"))
    assert len(files) == 4
    expected = 0
    for path in files:
        result = json.loads(path.read_text())
        rows = frame[frame.path == str(path)]
        assert list(rows.name) == list(result["values"])
        expected += len(result["values"])
        for _, row in rows.iterrows():
            v = result["values"][row["name"]]
            assert (row.value, row.n, row.unit) == (v["value"], v["n"], v["unit"])
            assert row.lo == v["lo"] if v["lo"] is not None else pd.isna(row.lo)
            assert row.headline == (row["name"] in result["headline"])
            assert row.label == result["checkpoint"]["label"] and row.sha256 == result["checkpoint"]["sha256"]
            assert (row.model, row.layer, row.n_tokens) == (
                result["eval"]["model"],
                result["eval"]["layer"],
                result["eval"]["n_tokens"],
            )
            assert row.wall_time_s == result["provenance"]["wall_time_s"]
            assert row.created == result["provenance"]["created"] and row.metric_version == 1
    assert len(frame) == expected
    b = frame[frame.label == "b"].iloc[0]
    assert (b.n_latents, b.k, b.d_in, b.training_tokens, b.variant) == (128, 8, 64, 4321, "no AuxK")
    assert b.format == "native" and b.architecture == "topk" and b.device == "cpu"
    a = frame[frame.label == "a"].iloc[0]
    assert pd.isna(a.training_tokens) and pd.isna(a.variant)
    assert str(frame.n_latents.dtype) == "Int64" and str(frame.value.dtype) == "float64"
    nmse = frame[(frame.metric == "core") & (frame.name == "nmse")].set_index("label").value
    assert (
        nmse["a"] == json.loads((results_folder / "a" / "core.json").read_text())["values"]["nmse"]["value"]
    )


def test_folders_empty_and_missing(results_folder, tmp_path):
    both = load_results([results_folder, results_folder])
    assert len(both) == 2 * len(load_results(results_folder))
    (tmp_path / "empty").mkdir()
    empty = load_results(tmp_path / "empty")
    assert empty.empty and list(empty.columns) == list(RESULT_COLUMNS)
    with pytest.raises(ValueError, match="nope: no such folder of result files"):
        load_results(tmp_path / "nope")


def test_leaderboard_writes_the_results_as_csv(results_folder, tmp_path):
    from saebench.leaderboard import generate

    generate([results_folder], tmp_path / "board")
    csv = (tmp_path / "board" / "results.csv").read_text()
    assert csv == load_results(results_folder).to_csv(index=False)
    back = pd.read_csv(tmp_path / "board" / "results.csv")
    frame = load_results(results_folder)
    assert list(back.columns) == list(RESULT_COLUMNS) and len(back) == len(frame)
    assert back.value.tolist() == frame.value.tolist()  # floats survive the round trip exactly
    assert not list((tmp_path / "board").glob(".*"))  # no temporary files left behind


def test_leaderboard_with_an_unknown_sort_writes_nothing(results_folder, tmp_path):
    from saebench.leaderboard import generate

    with pytest.raises(ValueError, match="cannot sort by 'core.bogus'"):
        generate([results_folder], tmp_path / "board", sort="core.bogus")
    assert not (tmp_path / "board").exists()
