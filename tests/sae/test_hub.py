"""hf:ORG/REPO[/SUB][@REV] and saelens:RELEASE/ID: a pre-populated local hub cache, offline, no network."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from saebench.results import file_digest
from saebench.sae import hub
from saebench.sae.load import CheckpointError, find_checkpoints, load_sae

COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40


def cache_repo(cache: Path, repo_id: str, files_from: Path, commit: str = COMMIT_MAIN, ref: str = "main"):
    """Put the files below `files_from` into the hub cache layout as the snapshot of `commit` at `ref`:
    models--ORG--REPO/{refs/REF, blobs/<sha256>, snapshots/COMMIT/<path> -> ../../blobs/<sha256>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for src in sorted(p for p in files_from.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / src.relative_to(files_from)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(src.relative_to(files_from).parts) + 1)) / "blobs" / blob.name)
    return repo


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def assert_same_sae(a, b, x):
    assert (a.n_latents, a.d_in, a.k, a.architecture) == (b.n_latents, b.d_in, b.k, b.architecture)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("kind", ["saelens", "sparsify", "dictionary_learning"])
def test_hub_subfolder_loads_like_the_local_folder(tmp_path, cache, writers, x, kind):
    repo = tmp_path / "repo"
    if kind == "saelens":
        writers.saelens(repo / "blocks.3.hook_resid_post", "topk")
        sub = "blocks.3.hook_resid_post"
    elif kind == "sparsify":
        writers.sparsify(repo / "run", "layers.5")
        sub = "run/layers.5"
    else:
        writers.dictionary_learning(repo / "sweep" / "trainer_2", "BatchTopKSAE")
        sub = "sweep/trainer_2"
    cache_repo(cache, "org/saes", repo)
    remote = load_sae(f"hf:org/saes/{sub}")
    local = load_sae(repo / sub)
    assert remote.info.format == local.info.format == kind
    assert remote.info.path == f"hf:org/saes/{sub}"
    assert_same_sae(remote, local, x)
    assert remote.info.layer == local.info.layer


def test_revision_picks_its_snapshot(tmp_path, cache, writers, x):
    writers.saelens(tmp_path / "main" / "sae", seed=0)
    writers.saelens(tmp_path / "v1" / "sae", seed=1)
    cache_repo(cache, "org/saes", tmp_path / "main")
    cache_repo(cache, "org/saes", tmp_path / "v1", commit=COMMIT_V1, ref="v1")
    assert_same_sae(load_sae("hf:org/saes/sae@v1"), load_sae(tmp_path / "v1" / "sae"), x)
    assert_same_sae(load_sae("hf:org/saes/sae"), load_sae(tmp_path / "main" / "sae"), x)
    assert_same_sae(load_sae(f"hf:org/saes/sae@{COMMIT_V1}"), load_sae(tmp_path / "v1" / "sae"), x)


def test_uncached_repo_offline_is_one_line_naming_it(cache):
    with pytest.raises(CheckpointError) as info:
        load_sae("hf:someone/not-here/layers.3")
    message = str(info.value)
    assert "\n" not in message
    assert "someone/not-here" in message and "not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message


def test_missing_subfolder_of_a_cached_repo_is_named(tmp_path, cache, writers):
    writers.saelens(tmp_path / "repo" / "sae")
    cache_repo(cache, "org/saes", tmp_path / "repo")
    with pytest.raises(CheckpointError, match=r"has no 'layers\.9'") as info:
        load_sae("hf:org/saes/layers.9")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["hf:", "hf:justone", "hf:org/repo@", "hf:org/../x", "saelens:release-only"])
def test_malformed_sources_are_refused_in_one_line(bad):
    with pytest.raises(CheckpointError) as info:
        hub.hub_ref(bad) if bad.startswith("saelens:") else hub.parse_hf(bad)
    assert "\n" not in str(info.value)


def test_parse_and_labels():
    ref = hub.parse_hf("hf:EleutherAI/sae-pythia/layers.4/sub@v2")
    assert ref == hub.HubRef("EleutherAI/sae-pythia", "layers.4/sub", "v2")
    assert str(ref) == "hf:EleutherAI/sae-pythia/layers.4/sub@v2"
    assert ref.label == "EleutherAI__sae-pythia__layers.4__sub+v2"
    assert hub.source_label("hf:org/repo") == "org__repo"
    assert hub.source_label("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre") == (
        "gpt2-small-res-jb__blocks.8.hook_resid_pre"
    )


def test_runner_labels_and_hashes_hub_checkpoints(tmp_path, cache, writers):
    from saebench.runner import check_label, discover

    writers.sparsify(tmp_path / "repo", "layers.2", seed=0)
    writers.sparsify(tmp_path / "repo", "layers.10", seed=1)
    cache_repo(cache, "org/sparsify-run", tmp_path / "repo")

    one = discover("hf:org/sparsify-run/layers.2")
    assert [(c.source, c.label) for c in one] == [
        ("hf:org/sparsify-run/layers.2", "org__sparsify-run__layers.2")
    ]
    assert one[0].sha256 == file_digest(tmp_path / "repo" / "layers.2")
    assert discover("hf:org/sparsify-run/layers.2", label="mine")[0].label == "mine"

    run = discover("hf:org/sparsify-run")
    assert [c.label for c in run] == ["org__sparsify-run__layers.2", "org__sparsify-run__layers.10"]
    assert [c.source for c in run] == ["hf:org/sparsify-run/layers.2", "hf:org/sparsify-run/layers.10"]
    assert [c.sha256 for c in run] == [file_digest(tmp_path / "repo" / h) for h in ("layers.2", "layers.10")]
    assert all(check_label(c.label) == c.label for c in run)
    assert [p.name for p in find_checkpoints("hf:org/sparsify-run")] == ["layers.2", "layers.10"]
    with pytest.raises(ValueError, match="drop --label"):
        discover("hf:org/sparsify-run", label="mine")


# --- SAELens' registry -------------------------------------------------------------------------------------


def fake_registry(tmp_path, monkeypatch, entries: dict) -> None:
    path = tmp_path / "pretrained_saes.yaml"
    path.write_text(yaml.safe_dump(entries))
    monkeypatch.setattr(hub, "saelens_registry_path", lambda: path)


def test_saelens_release_resolves_through_the_registry(tmp_path, cache, writers, x, monkeypatch):
    writers.saelens(tmp_path / "repo" / "blocks.3.hook_resid_post", "jumprelu")
    cache_repo(cache, "someone/my-saes", tmp_path / "repo")
    fake_registry(
        tmp_path,
        monkeypatch,
        {
            "my-release": {
                "repo_id": "someone/my-saes",
                "model": "gpt2",
                "conversion_func": None,
                "saes": [{"id": "layer_3/width_24", "path": "blocks.3.hook_resid_post", "l0": 4}],
            }
        },
    )
    sae = load_sae("saelens:my-release/layer_3/width_24")
    assert_same_sae(sae, load_sae(tmp_path / "repo" / "blocks.3.hook_resid_post"), x)
    assert sae.info.path == "saelens:my-release/layer_3/width_24"
    from saebench.runner import discover

    [ckpt] = discover("saelens:my-release/layer_3/width_24")
    assert ckpt.label == "my-release__layer_3__width_24"
    assert ckpt.sha256 == file_digest(tmp_path / "repo" / "blocks.3.hook_resid_post")

    with pytest.raises(CheckpointError, match="no SAE id 'layer_9'.*layer_3/width_24"):
        load_sae("saelens:my-release/layer_9")
    with pytest.raises(CheckpointError, match="no release 'other'"):
        load_sae("saelens:other/x")


def test_saelens_without_the_package_gives_the_install_hint(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "sae-lens":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(CheckpointError) as info:
        load_sae("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps sae-lens" in message and "hf:" in message


def test_real_registry_names_the_jbloom_gpt2_release():
    try:
        importlib.metadata.distribution("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sae-lens is not installed (pip install --no-deps sae-lens)")
    ref = hub.saelens_ref("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert ref == hub.HubRef("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")


def test_a_copied_cache_is_the_same_checkpoint(tmp_path, cache, writers):
    """The sha256 is of the files, not of where the cache lives."""
    writers.saelens(tmp_path / "repo" / "sae")
    cache_repo(cache, "org/saes", tmp_path / "repo")
    first = hub.remote_checkpoints("hf:org/saes/sae")[0]
    other = tmp_path / "hub2"
    shutil.copytree(cache, other, symlinks=True)
    hub._download.cache_clear()
    second = hub._download(hub.parse_hf("hf:org/saes/sae"), True, str(other), "hf:org/saes/sae")
    assert file_digest(first[2]) == file_digest(second) and first[2] != second


def test_run_files_a_hub_checkpoint_under_its_label(tmp_path, cache, tiny_llama, corpus_file):
    from saebench.runner import RunConfig, Runner
    from saebench.sae.formats.native import save_native
    from tests.conftest import random_sae, tiny_eval_config

    save_native(random_sae(tiny_llama.d_model, 32, k=4), tmp_path / "repo" / "topk" / "sae")
    cache_repo(cache, "org/my-saes", tmp_path / "repo")
    config = RunConfig(
        checkpoint="hf:org/my-saes/topk/sae",
        metrics=["core"],
        eval=tiny_eval_config(tmp_path, corpus_file, n_tokens=4 * 15, batch_size=4),
        out=str(tmp_path / "results"),
    )
    [result] = Runner(config, model=tiny_llama).run()
    assert result["checkpoint"]["source"] == "hf:org/my-saes/topk/sae"
    assert result["checkpoint"]["label"] == "org__my-saes__topk__sae"
    assert result["checkpoint"]["sha256"] == file_digest(tmp_path / "repo" / "topk" / "sae")
    assert (tmp_path / "results" / "org__my-saes__topk__sae" / "core.json").is_file()
    again = Runner(config, model=tiny_llama).run()[0]  # reused: same key
    assert again["key"] == result["key"] and again["provenance"] == result["provenance"]
