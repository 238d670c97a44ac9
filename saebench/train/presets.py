"""Named training configurations and the sweeps made of them, as data.

The baseline sweep (Gao et al. 2024's comparison at small scale):
  - TopK, n in {2048, 4096, 8192, 16384} x k in {16, 32, 64}, with AuxK and tied init (the recipe);
  - ReLU + L1 at the same n, one per k: each is a fixed-lambda run, lambda found by a search over
    full-length runs until the run ends at L0 ~ k (`l1_target_l0`, see `l1_search.py`);
  - one ablation: TopK n=16384, k=32 without AuxK and with independent (untied) encoder init.

The fixed-lr sweep repeats the TopK grid with every n at the lr the paper's law gives n=2048
(2e-4 sqrt(8)): at short budgets the 1/sqrt(n) law leaves large dictionaries undertrained, and this
sweep shows how much of the nmse-vs-n trend that accounts for.

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


#: the lr of the fixed-lr sweep: the paper's law at the smallest n
FIXED_LR = 2e-4 / (min(SWEEP_N) / 2**14) ** 0.5


def _fixed_lr() -> dict[str, TrainConfig]:
    return {
        f"topk-n{n}-k{k}-fixedlr": TrainConfig(activation="topk", n_latents=n, k=k, lr=FIXED_LR)
        for n in SWEEP_N
        for k in SWEEP_K
    }


#: every preset by name
PRESETS: dict[str, TrainConfig] = {**_baseline(), **_fixed_lr()}
#: sweep name -> preset names, in training order
SWEEPS: dict[str, tuple[str, ...]] = {"baseline": tuple(_baseline()), "fixed-lr": tuple(_fixed_lr())}


def sweep(name: str, **overrides) -> dict[str, TrainConfig]:
    """The configs of sweep `name`, each with `overrides` applied (e.g. max_tokens=..., device=...)."""
    if name not in SWEEPS:
        raise KeyError(f"unknown sweep {name!r}; known: {sorted(SWEEPS)}")
    return {preset: replace(PRESETS[preset], **overrides) for preset in SWEEPS[name]}
