"""Subject models: offline aliases, loading (GGUF -> safetensors cache), running to and from the site."""

from saebench.model.aliases import ALIASES, DEFAULT_MODEL, Alias, AliasPackageMissing, resolve_alias
from saebench.model.batched import (
    Ragged,
    SiteEdits,
    UpperCache,
    cache_above_site,
    median_centred_norms,
    run_from_site,
    site_residuals,
)
from saebench.model.families import FAMILIES, Family, UnsupportedModelError
from saebench.model.loading import ModelLoadError, cache_root, default_layer, load_model, model_id
from saebench.model.subject import SubjectModel

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "FAMILIES",
    "Alias",
    "AliasPackageMissing",
    "Family",
    "ModelLoadError",
    "Ragged",
    "SiteEdits",
    "SubjectModel",
    "UnsupportedModelError",
    "UpperCache",
    "cache_above_site",
    "cache_root",
    "default_layer",
    "load_model",
    "median_centred_norms",
    "model_id",
    "resolve_alias",
    "run_from_site",
    "site_residuals",
]
