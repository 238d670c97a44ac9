"""Reference dictionaries built from the activations themselves (`--checkpoint builtin:NAME[:k=..,n=..]`).

They are baselines, not SAEs anyone trained: a row every metric can be compared against, available on a
fresh machine without a trained checkpoint.  Both are fitted on training-split tokens (never the evaluation
windows) and use a TopK code on (u - mu), with u the SAE-space input and mu its mean:

    pca-topk     latents = the +/- principal directions of u (n = 2 d); TopK keeps the k largest
                 |projections|, i.e. the best k-term reconstruction in the PCA basis.
    random-topk  n random unit directions (encoder = decoder transpose); TopK as above.  A floor.

The space u lives in is the reference trainer's by default (`space=layer_norm`: per-token layer norm,
`saebench.train`'s `Normalization("layer_norm")`), so a baseline's nmse compares with the trained SAEs';
`space=raw` fits the raw residuals (u = x; its nmse is then fvu_raw, dominated by the few huge residual
directions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saebench.sae.sae import SAE, Normalization, SAEInfo

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinSpec:
    """A parsed `builtin:NAME[:k=32,n=4096]`."""

    #: pca-topk | random-topk
    name: str
    #: active latents per token
    k: int = 32
    #: latents for random-topk (pca-topk always has 2 d)
    n: int = 16384
    #: training tokens the baseline is fitted on
    fit_tokens: int = 16384
    #: input space: "layer_norm" (the reference trainer's per-token layer norm) or "raw" (no normalisation)
    space: str = "layer_norm"

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r} of builtin:{self.name}; one of {SPACES}")

    @property
    def label(self) -> str:
        size = "" if self.name == "pca-topk" else f"-n{self.n}"
        space = "" if self.space == "layer_norm" else f"-{self.space}"
        return f"builtin-{self.name}{space}{size}-k{self.k}"

    def normalization(self) -> Normalization:
        return Normalization("none" if self.space == "raw" else self.space)


BUILDERS = ("pca-topk", "random-topk")
SPACES = ("layer_norm", "raw")


def is_builtin(checkpoint: str) -> bool:
    return str(checkpoint).startswith(BUILTIN_PREFIX)


def parse_builtin(checkpoint: str) -> BuiltinSpec:
    body = str(checkpoint)[len(BUILTIN_PREFIX) :]
    name, _, opts = body.partition(":")
    if name not in BUILDERS:
        available = ", ".join(BUILTIN_PREFIX + b for b in BUILDERS)
        raise ValueError(f"unknown built-in baseline {name!r}; available: {available}")
    kwargs: dict = {}
    for item in filter(None, opts.split(",")):
        field_name, eq, value = item.partition("=")
        if field_name == "space" and value in SPACES:
            kwargs[field_name] = value
            continue
        if field_name not in ("k", "n", "fit_tokens") or not eq or not value.isdigit():
            raise ValueError(
                f"bad option {item!r} in {checkpoint!r}; use e.g. builtin:{name}:k=32,n=4096 "
                f"(and space=raw for raw residuals; spaces: {', '.join(SPACES)})"
            )
        kwargs[field_name] = int(value)
    return BuiltinSpec(name, **kwargs)


def build_builtin(spec: BuiltinSpec, sample: torch.Tensor, *, seed: int = 0) -> SAE:
    """Fit the baseline on raw residuals `sample` (tokens, d), in the spec's input space."""
    normalization = spec.normalization()
    x, _ = normalization.apply(sample.double())
    d = x.shape[1]
    mu = x.mean(0)
    if spec.name == "pca-topk":
        cov = (x - mu).T @ (x - mu) / max(len(x) - 1, 1)
        _, vecs = torch.linalg.eigh(cov)
        directions = vecs.flip(1).T  # (d, d), rows by decreasing variance
        W_dec = torch.cat([directions, -directions])
    else:
        W_dec = random_directions(spec.n, d, seed)
    n = W_dec.shape[0]
    if not 0 < spec.k <= n:
        raise ValueError(f"{BUILTIN_PREFIX}{spec.name} has {n} latents; k={spec.k} must be between 1 and {n}")
    info = SAEInfo(
        format="builtin",
        architecture=spec.name,
        path=BUILTIN_PREFIX + spec.name,
        extra={"fit_tokens": len(x), "k": spec.k, "space": spec.space},
    )
    f = torch.float32
    W_dec = W_dec.to(f)
    return SAE(
        W_dec.T.contiguous(),
        torch.zeros(n, dtype=f),
        W_dec,
        mu.to(f),
        activation="topk",
        k=spec.k,
        b_pre=mu.to(f),
        normalization=normalization,
        info=info,
    )


def random_directions(n: int, d: int, seed: int, block_rows: int = 1 << 14) -> torch.Tensor:
    """n random unit vectors (n, d) float32: float64 normal draws normalised, `block_rows` rows at a time (the
    last block takes the rest, under 2 block_rows), so a wide dictionary never exists in float64 whole.
    torch draws normals 16 at a time from uniforms and redraws the last 16 of a size not a multiple of 16;
    blocks of a multiple of 16 rows (and a last block of at least 16 values) draw what one call of all n rows
    draws, so the directions do not depend on the blocks."""
    if block_rows % 16:
        raise ValueError(f"random_directions: block_rows must be a multiple of 16, got {block_rows}")
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, d, dtype=torch.float32)
    start = 0
    while start < n:
        stop = n if n - start < 2 * block_rows else start + block_rows
        block = torch.randn(stop - start, d, generator=g, dtype=torch.float64)
        out[start:stop] = block / block.norm(dim=1, keepdim=True)
        start = stop
    return out
