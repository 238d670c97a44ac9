"""Text tables from a source string: sae-probes data files, local files, Hugging Face data sets.

A source is one of

    sae-probes:<stem>            the zstd CSV `cleaned_data/<stem>.csv.zst` in the `sae-probes` package
    path/to/file.csv             also .csv.zst, .jsonl, .parquet, .txt (documents separated by blank lines,
                                 one column `text`); a relative path is looked up under `base_dir` first
    owner/name[:config]          a Hugging Face data set, loaded with `datasets` (needs the network)

`read_table` gives a pandas DataFrame with the columns as stored; `source_fingerprint` a stable identity
for cache keys and result provenance.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import re
from pathlib import Path

import pandas as pd

SAE_PROBES_PREFIX = "sae-probes:"
SAE_PROBES_DISTRIBUTION = "sae-probes"
SAE_PROBES_INSTALL = "pip install --no-deps sae-probes==0.4.2"
SAE_PROBES_DATA_DIR = "sae_probes/data/cleaned_data"
LOCAL_SUFFIXES = (".csv.zst", ".csv", ".jsonl", ".parquet", ".txt")

_HASH_CHUNK = 1 << 20
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_file_hash_memo: dict[tuple[str, int, int], str] = {}


class SourceError(ValueError):
    """A source string that cannot be read: missing file or package, unknown format, unreachable hub."""


def read_table(source: str, *, split: str | None = None, base_dir: Path | None = None) -> pd.DataFrame:
    """Read the table a source string names. `split` is for Hugging Face data sets (default "train")."""
    if source.startswith(SAE_PROBES_PREFIX):
        return _read_zst_csv(sae_probes_path(source[len(SAE_PROBES_PREFIX) :]))
    path = _local_path(source, base_dir)
    if path is not None:
        return _read_local(path)
    return _read_hub(source, split)


def source_fingerprint(source: str, *, split: str | None = None, base_dir: Path | None = None) -> str:
    """A stable identity of the data a source names: package version + stem, file content hash, or hub id."""
    if source.startswith(SAE_PROBES_PREFIX):
        stem = source[len(SAE_PROBES_PREFIX) :]
        sae_probes_path(stem)  # fails early, with the install command, when the package or file is absent
        return f"sae-probes=={importlib.metadata.version(SAE_PROBES_DISTRIBUTION)}:{stem}"
    path = _local_path(source, base_dir)
    if path is not None:
        return f"file:{path.name}:sha256={_file_sha256(path)}"
    dataset_id, config = _split_hub_id(source)
    return f"hf:{dataset_id}:{config or ''}:{split or 'train'}"


def sae_probes_path(stem: str) -> Path:
    """The path of one sae-probes data file, found through the package metadata (never imported)."""
    folder, version = _sae_probes_folder(f"source 'sae-probes:{stem}'")
    path = folder / f"{stem}.csv.zst"
    if not path.is_file():
        raise SourceError(
            f"sae-probes {version} has no data file {stem!r} in {folder}: "
            f"check the stem against the files there (or run `{SAE_PROBES_INSTALL}`)"
        )
    return path


def sae_probes_stems() -> list[str]:
    """All data-file stems the installed sae-probes package ships, sorted."""
    folder, _ = _sae_probes_folder("listing sae-probes data files")
    return sorted(p.name[: -len(".csv.zst")] for p in folder.glob("*.csv.zst"))


def _sae_probes_folder(purpose: str) -> tuple[Path, str]:
    """The installed package's data folder and version; an absent package gives the install command."""
    try:
        dist = importlib.metadata.distribution(SAE_PROBES_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"{purpose} needs the sae-probes package: run `{SAE_PROBES_INSTALL}`") from None
    return Path(str(dist.locate_file(SAE_PROBES_DATA_DIR))), dist.version


def _local_path(source: str, base_dir: Path | None) -> Path | None:
    """The file a source names, or None when it names a hub data set; a missing local file is an error."""
    candidates = [Path(source).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.insert(0, Path(base_dir) / source)
    for candidate in candidates:
        if candidate.is_file():
            if not candidate.name.lower().endswith(LOCAL_SUFFIXES):
                raise SourceError(
                    f"cannot read {candidate}: supported file types are {', '.join(LOCAL_SUFFIXES)}"
                )
            return candidate.resolve()
    if source.lower().endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
        where = " or ".join(str(c) for c in candidates)
        raise SourceError(f"data file not found: {where}; check the path in the task or --corpus")
    return None


def _read_local(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    try:
        if name.endswith(".csv.zst"):
            return _read_zst_csv(path)
        if name.endswith(".csv"):
            return _read_csv(path.read_bytes())
        if name.endswith(".jsonl"):
            return pd.read_json(path, lines=True, dtype=False)
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        text = path.read_text(encoding="utf-8")
        documents = [doc.strip() for doc in _BLANK_LINE.split(text)]
        return pd.DataFrame({"text": [doc for doc in documents if doc]})
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {_first_line(exc)}") from None


def _read_zst_csv(path: Path) -> pd.DataFrame:
    import zstandard

    # The sae-probes frames carry no content size, so a one-shot decompress() refuses them: stream instead.
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        data = reader.read()
    return _read_csv(data)


def _read_csv(data: bytes) -> pd.DataFrame:
    # Only an empty cell is missing: prompts such as "NA" or "None" are text.
    return pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""])


def _split_hub_id(source: str) -> tuple[str, str | None]:
    dataset_id, _, config = source.partition(":")
    return dataset_id, config or None


def _read_hub(source: str, split: str | None) -> pd.DataFrame:
    dataset_id, config = _split_hub_id(source)
    try:
        import datasets
    except ImportError:
        raise SourceError(
            f"source {source!r} is a Hugging Face data set and needs `pip install datasets`"
        ) from None
    split = split or "train"
    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # the hub raises many kinds; the user needs one line either way
        raise SourceError(
            f"cannot load Hugging Face data set {source!r} (split {split!r}): {_first_line(exc)}; "
            "check the id and the network, or use a local .csv/.jsonl/.parquet file"
        ) from None
    return dataset.to_pandas()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hash_memo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        _file_hash_memo[key] = digest.hexdigest()
    return _file_hash_memo[key]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
