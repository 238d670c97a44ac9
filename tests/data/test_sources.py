"""Reading tables from sae-probes, local files and (faked) Hugging Face data sets; fingerprints."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pandas as pd
import pytest
import zstandard

from saebench.data import sources
from saebench.data.sources import SourceError, read_table, source_fingerprint


def test_sae_probes_table_with_a_space_in_its_stem():
    table = read_table("sae-probes:146_disease_class_cardiovascular diseases")
    assert {"prompt", "target"} <= set(table.columns)
    assert len(table) == 1052
    assert set(table["target"]) == {0, 1}


def test_sae_probes_fingerprint_names_version_and_stem():
    version = importlib.metadata.version("sae-probes")
    assert (
        source_fingerprint("sae-probes:21_headline_istrump") == f"sae-probes=={version}:21_headline_istrump"
    )


def test_unknown_stem_and_missing_package_say_what_to_do(monkeypatch):
    with pytest.raises(SourceError, match="no data file 'not_a_stem'"):
        read_table("sae-probes:not_a_stem")

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sources.importlib.metadata, "distribution", absent)
    with pytest.raises(SourceError, match=r"run `pip install --no-deps sae-probes==0\.4\.2`"):
        read_table("sae-probes:21_headline_istrump")


def test_local_formats_read_the_same_table(tmp_path):
    frame = pd.DataFrame({"prompt": ["a b", "NA", "c"], "target": [True, False, True]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    # A zstd frame without a content size, as in sae-probes.
    compressor = zstandard.ZstdCompressor()
    with open(tmp_path / "t.csv.zst", "wb") as out, compressor.stream_writer(out) as writer:
        writer.write((tmp_path / "t.csv").read_bytes())
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.csv.zst", "t.jsonl", "t.parquet"):
        table = read_table(str(tmp_path / name))
        assert table["prompt"].tolist() == ["a b", "NA", "c"], name  # "NA" is text, not missing
        assert table["target"].tolist() == [True, False, True], name


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    (tmp_path / "c.txt").write_text("first doc\nline two\n\n  \n\nsecond doc\n")
    assert read_table(str(tmp_path / "c.txt"))["text"].tolist() == ["first doc\nline two", "second doc"]


def test_txt_without_blank_lines_is_one_document_and_crlf_files_split_alike(tmp_path):
    long = "\n".join(f"line {k} of a long note" for k in range(500))
    (tmp_path / "one.txt").write_text(long + "\n")
    assert read_table(str(tmp_path / "one.txt"))["text"].tolist() == [long]
    (tmp_path / "crlf.txt").write_bytes(b"first doc\r\nline two\r\n\r\nsecond doc\r\n")
    assert read_table(str(tmp_path / "crlf.txt"))["text"].tolist() == ["first doc\nline two", "second doc"]


def test_relative_paths_resolve_under_base_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "sub" / "d.csv", index=False)
    assert read_table("sub/d.csv", base_dir=tmp_path)["text"].tolist() == ["x"]
    with pytest.raises(SourceError, match="data file not found"):
        read_table("sub/missing.csv", base_dir=tmp_path)


def test_unsupported_file_type_is_an_error(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(SourceError, match="supported file types are"):
        read_table(str(tmp_path / "d.xlsx"))


def test_file_fingerprint_follows_content_not_name(tmp_path):
    (tmp_path / "a.csv").write_text("text\nx\n")
    (tmp_path / "b.csv").write_text("text\nx\n")
    fa, fb = source_fingerprint(str(tmp_path / "a.csv")), source_fingerprint(str(tmp_path / "b.csv"))
    assert fa.split("sha256=")[1] == fb.split("sha256=")[1]
    (tmp_path / "a.csv").write_text("text\ny\n")
    assert source_fingerprint(str(tmp_path / "a.csv")) != fa


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_failure_is_one_line(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/data' on the Hub\nretry details\nmore details")

    _fake_datasets(monkeypatch, unreachable)
    with pytest.raises(SourceError) as info:
        read_table("owner/data:config", split="test")
    message = str(info.value)
    assert "\n" not in message
    assert "cannot load Hugging Face data set 'owner/data:config' (split 'test')" in message
    assert "Couldn't reach" in message


def test_hub_data_set_id_config_and_split(monkeypatch):
    calls = []

    class FakeDataset:
        def to_pandas(self):
            return pd.DataFrame({"text": ["hub doc"]})

    def load_dataset(dataset_id, config, split):
        calls.append((dataset_id, config, split))
        return FakeDataset()

    _fake_datasets(monkeypatch, load_dataset)
    assert read_table("owner/data:cfg")["text"].tolist() == ["hub doc"]
    assert read_table("owner/data", split="validation")["text"].tolist() == ["hub doc"]
    assert calls == [("owner/data", "cfg", "train"), ("owner/data", None, "validation")]
    assert source_fingerprint("owner/data:cfg", split="test") == "hf:owner/data:cfg:test"
