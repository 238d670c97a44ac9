"""Named training configurations and the sweeps made of them, as data.

The baseline sweep (Gao et al. 2024's comparison at small scale):
  - TopK, n in {2048, 4096, 8192, 16384} x k in {16, 32, 64}, with AuxK and tied init (the recipe);
  - ReLU + L1 at the same n, one per k: lambda is chosen per k by matching L0 = k on the training stream
    (`l1_target_l0`: lambda is adapted multiplicatively over the first half of the run, then held fixed,
    so the second half trains the plain fixed-lambda objective);
  - one ablation: TopK n=16384, k=32 without AuxK and with independent (untied) encoder init.

Every preset leaves the run length (max_tokens), device and dtype to the caller:
`dataclasses.replace(PRESETS[name], max_tokens=..., device=...)`.
"""

from __future__ import annotations

from dataclasses import replace

from .config import TrainConfig

SWEEP_N = (2048, 4096, 8192, 16384)
SWEEP_K = (16, 32, 64)


def _baseline() -> dict[str, TrainConfig]:
    presets = {}
    for n in SWEEP_N:
        for k in SWEEP_K:
            presets[f"topk-n{n}-k{k}"] = TrainConfig(activation="topk", n_latents=n, k=k)
    for n in SWEEP_N:
        for k in SWEEP_K:
            presets[f"relu-n{n}-l0{k}"] = TrainConfig(activation="relu", n_latents=n, k=k, l1_target_l0=k)
    presets["topk-n16384-k32-noauxk-untied"] = TrainConfig(
        n_latents=16384, k=32, auxk_alpha=0.0, tied_init=False
    )
    return presets


#: every preset by name; ReLU presets need max_tokens (their lambda calibration is a fraction of it)
PRESETS: dict[str, TrainConfig] = _baseline()
#: sweep name -> preset names, in training order
SWEEPS: dict[str, tuple[str, ...]] = {"baseline": tuple(PRESETS)}


def sweep(name: str, **overrides) -> dict[str, TrainConfig]:
    """The configs of sweep `name`, each with `overrides` applied (e.g. max_tokens=..., device=...)."""
    if name not in SWEEPS:
        raise KeyError(f"unknown sweep {name!r}; known: {sorted(SWEEPS)}")
    return {preset: replace(PRESETS[preset], **overrides) for preset in SWEEPS[name]}
