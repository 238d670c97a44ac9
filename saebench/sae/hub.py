"""Checkpoints on the Hugging Face hub and SAELens' pretrained releases, resolved to local folders.

    hf:ORG/REPO[/SUBFOLDER][@REVISION]   downloaded with `huggingface_hub.snapshot_download` (only
                                         SUBFOLDER's files) into its usual cache, then read as a local
                                         folder: a SAELens release folder, a sparsify run or hookpoint
                                         folder, a dictionary_learning trainer folder, ...
    saelens:RELEASE/SAE_ID               looked up in SAELens' registry of releases (the
                                         `pretrained_saes.yaml` its package ships; sae-lens is never
                                         imported) -> hf:REPO_ID/PATH

Offline (`HF_HUB_OFFLINE=1`) nothing is downloaded: a cached snapshot is used, and an uncached one is a
one-line `CheckpointError`.  `HF_HUB_CACHE` / `HF_HOME` choose the cache as they do for the hub library.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

from saebench.sae.formats.common import CheckpointError

HF_PREFIX = "hf:"
SAELENS_PREFIX = "saelens:"
SAELENS_DISTRIBUTION = "sae-lens"
SAELENS_REGISTRY = "sae_lens/pretrained_saes.yaml"
SAELENS_INSTALL = "pip install --no-deps sae-lens"

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubRef:
    """A folder of a hub model repository at a revision (None: the default branch)."""

    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}{sub}{rev}"

    @property
    def label(self) -> str:
        """ORG__REPO[__SUB...][+REVISION]: the results folder name of a checkpoint from here."""
        parts = [*self.repo_id.split("/"), *(p for p in self.subfolder.split("/") if p)]
        return "__".join(parts) + (f"+{self.revision}" if self.revision else "")

    def below(self, relative: str) -> HubRef:
        """The folder `relative` below this one, at the same revision."""
        sub = "/".join(p for p in (self.subfolder, relative) if p and p != ".")
        return HubRef(self.repo_id, sub, self.revision)


def is_remote(source: str | Path) -> bool:
    """Whether a checkpoint source names the hub (`hf:`) or a SAELens release (`saelens:`)."""
    return isinstance(source, str) and source.startswith((HF_PREFIX, SAELENS_PREFIX))


def parse_hf(source: str) -> HubRef:
    """`hf:ORG/REPO[/SUBFOLDER][@REVISION]` -> HubRef; a malformed one is a one-line CheckpointError."""
    spec = source.removeprefix(HF_PREFIX)
    spec, _, revision = spec.partition("@")
    parts = [p for p in spec.strip("/").split("/") if p]
    if len(parts) < 2 or not all(_REPO_PART.match(p) for p in parts[:2]) or ".." in parts:
        raise CheckpointError(
            f"{source}: not a hub checkpoint; write hf:ORG/REPO[/SUBFOLDER][@REVISION], e.g. "
            "hf:EleutherAI/sae-pythia-70m-32k/layers.4"
        )
    if "@" in source and not revision:
        raise CheckpointError(f"{source}: empty revision after @; name a branch, tag or commit")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def hub_ref(source: str) -> HubRef:
    """The hub folder an `hf:` or `saelens:` source names (a SAELens release through its registry)."""
    if source.startswith(SAELENS_PREFIX):
        return saelens_ref(source)
    return parse_hf(source)


def source_label(source: str) -> str:
    """The results folder name of a remote checkpoint: ORG__REPO__SUB, or RELEASE__SAE_ID for SAELens."""
    if source.startswith(SAELENS_PREFIX):
        release, sae_id = _split_saelens(source)
        return "__".join(p for p in (release, *sae_id.split("/")) if p)
    return parse_hf(source).label


def hub_offline() -> bool:
    """Whether downloads are off: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, else None (the hub library's default, ~/.cache/huggingface/hub).

    Read at each call: the hub library reads them once, at its import."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def resolve(source: str) -> Path:
    """The local folder (or file) a remote source names, downloading it first unless offline."""
    ref = hub_ref(source)
    return _download(ref, hub_offline(), hub_cache_dir(), source)


@functools.lru_cache(maxsize=64)
def _download(ref: HubRef, offline: bool, cache_dir: str | None, source: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"{source}: hub checkpoints need `pip install huggingface_hub`") from None
    patterns = [f"{ref.subfolder}/*"] if ref.subfolder else None
    try:
        folder = snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        where = f" (revision {ref.revision})" if ref.revision else ""
        why = (
            "HF_HUB_OFFLINE=1 and it is not cached"
            if offline
            else "the hub cannot be reached and it is not cached"
        )
        raise CheckpointError(
            f"{source}: {ref.repo_id}{where} is not in the Hugging Face cache ({cache_dir or 'default'}): "
            f"{why}; download it once online (unset HF_HUB_OFFLINE) or pass a local folder"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as err:
        kind = "gated (log in with `hf auth login`)" if isinstance(err, GatedRepoError) else "not found"
        raise CheckpointError(f"{source}: hub repository {ref.repo_id} is {kind}") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source}: {ref.repo_id} has no revision {ref.revision!r}") from None
    except Exception as err:  # the hub raises many kinds (HTTP, incomplete snapshots); one line is enough
        text = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise CheckpointError(f"{source}: cannot download {ref.repo_id}: {text}") from None
    path = Path(folder) / ref.subfolder if ref.subfolder else Path(folder)
    if not path.exists():
        raise CheckpointError(
            f"{source}: {ref.repo_id}{'@' + ref.revision if ref.revision else ''} has no {ref.subfolder!r}; "
            "check the folder name in the repository's file list"
        )
    return path


# --- SAELens' registry of pretrained releases -------------------------------------------------------------


def _split_saelens(source: str) -> tuple[str, str]:
    release, _, sae_id = source.removeprefix(SAELENS_PREFIX).partition("/")
    if not release or not sae_id:
        raise CheckpointError(
            f"{source}: write saelens:RELEASE/SAE_ID, e.g. saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre"
        )
    return release, sae_id


def saelens_registry_path() -> Path:
    """The registry YAML the installed sae-lens ships; an absent package gives the install hint."""
    try:
        dist = importlib.metadata.distribution(SAELENS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"saelens: release names are resolved through SAELens' registry: run `{SAELENS_INSTALL}`, "
            "or pass hf:REPO_ID/PATH"
        ) from None
    path = Path(str(dist.locate_file(SAELENS_REGISTRY)))
    if not path.is_file():
        raise CheckpointError(f"sae-lens {dist.version} ships no {SAELENS_REGISTRY}; pass hf:REPO_ID/PATH")
    return path


@functools.lru_cache(maxsize=2)
def _registry(path: Path, mtime_ns: int) -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=loader) or {}  # noqa: S506 -- a safe loader


def saelens_registry() -> dict:
    """{release: {repo_id, model, saes: [{id, path, ...}], ...}} from SAELens' pretrained_saes.yaml."""
    path = saelens_registry_path()
    return _registry(path, path.stat().st_mtime_ns)


def saelens_ref(source: str) -> HubRef:
    """`saelens:RELEASE/SAE_ID` -> the hub folder the registry names for it."""
    release, sae_id = _split_saelens(source)
    registry = saelens_registry()
    entry = registry.get(release)
    if not isinstance(entry, dict) or "repo_id" not in entry:
        close = sorted(name for name in registry if release.lower() in str(name).lower())[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise CheckpointError(f"{source}: SAELens' registry has no release {release!r}{hint}")
    saes = entry.get("saes") or []
    match = next((s for s in saes if isinstance(s, dict) and s.get("id") == sae_id), None)
    if match is None:
        examples = ", ".join(str(s.get("id")) for s in saes[:3] if isinstance(s, dict))
        raise CheckpointError(
            f"{source}: release {release!r} has no SAE id {sae_id!r} ({len(saes)} ids, e.g. {examples})"
        )
    return parse_hf(HF_PREFIX + f"{entry['repo_id']}/{match.get('path') or ''}".rstrip("/"))


def remote_checkpoints(source: str) -> list[tuple[str, str, Path]]:
    """(source, label, local path) of every checkpoint at or below a remote source, naturally sorted.

    One checkpoint keeps the source as given and its `source_label`; a folder of several (a sparsify run, a
    dictionary_learning sweep) gives each its own `hf:` source and the label extended by its path below.
    """
    from saebench.sae.load import find_checkpoints

    root, local = hub_ref(source), resolve(source)
    paths = [local] if local.is_file() else find_checkpoints(local)
    found = []
    for path in paths:
        rel = path.relative_to(local).parts if path != local else ()
        if len(rel) > 1 and rel[-1] == "sae":  # a saebench trainer run folder: <run>/sae
            rel = rel[:-1]
        here = source if path == local else str(root.below("/".join(path.relative_to(local).parts)))
        found.append((here, "__".join((source_label(source), *rel)), path))
    return found
