"""Named training configurations and the sweeps made of them, as data.

The baseline sweep (Gao et al. 2024's comparison at small scale):
  - TopK, n in {2048, 4096, 8192, 16384} x k in {16, 32, 64}, with AuxK and tied init (the recipe);
  - ReLU + L1 at the same n, one per k: each is a fixed-lambda run, lambda found by a search over
    full-length runs until the run ends at L0 ~ k (`l1_target_l0`, see `l1_search.py`);
  - one ablation: TopK n=16384, k=32 without AuxK and with independent (untied) encoder init.

The fixed-lr sweep repeats the TopK grid with every n at the lr n=2048 gets (the fitted trend where one
applies, else the paper's law: 2e-4 sqrt(8); `lr_at_n`): a falling lr leaves large dictionaries
undertrained at short budgets, and this sweep shows how much of the nmse-vs-n trend that accounts for.

The lr sweep (Gao et al. sweep the lr at small scale and extrapolate the trend): TopK at k=32 for every
n in SWEEP_N, each at LR_FACTORS times the paper's lr for that n, 2x to 16x in steps of 2^0.75 (5 points,
8x wide).  The grid sits above the paper's rule on purpose: at ~500k tokens and batch 1024, n=4096 did
best near 2e-3 (5x the rule; 1x and 1.4x the rule were 45% and 35% worse in delta_ce, 20x was worse
again, with 60% of latents dead), so a grid centred on the rule would put the best lr at its top edge.
Centred at 5.7x it brackets that optimum at n=4096, and it still brackets the optimum at the other n if
the best lr falls anywhere between 1/sqrt(n) (the paper's slope) and flat in n.  `lr_sweep.py` scores
the runs and fits the trend; `--install-trend` makes it the default lr (`lr_trend.py`).

The relu-lr sweep tunes the ReLU baseline's own lr the same way: ReLU + L1 at L0 target 32 for each n in
RELU_LR_N, at RELU_LR_FACTORS times the paper's lr (1x ... 16x, log-spaced: no earlier run says where
ReLU's optimum lies), each run's lambda searched to the target (`l1_search.py`) and the search's chosen run
scored, so the lrs compare at (nearly) the same L0; the table prints each run's L0.  Its trend is filed
under "relu" beside TopK's, and the baseline's lambda searches then run at it.

The dead-latents sweep separates the paper's two mitigations where latents do die at our budget: at the
tuned lr few do, so it trains TopK n=4096, k=32 at DEAD_LR (about 3.5x the tuned lr, where 60% of the
recipe's latents died in an earlier run) three ways: the recipe, without AuxK, and without AuxK and with
an untied encoder init.  The leaderboard pairs each with the recipe run of the same settings.

Every preset leaves the run length (max_tokens), device and dtype to the caller:
`dataclasses.replace(PRESETS[name], max_tokens=..., device=...)`.
"""

from __future__ import annotations

from dataclasses import replace

from .config import TrainConfig
from .lr_trend import paper_lr

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


#: the fixed-lr sweep trains every n at the lr of the smallest n
FIXED_LR_N = min(SWEEP_N)


def _fixed_lr() -> dict[str, TrainConfig]:
    return {
        f"topk-n{n}-k{k}-fixedlr": TrainConfig(activation="topk", n_latents=n, k=k, lr_at_n=FIXED_LR_N)
        for n in SWEEP_N
        for k in SWEEP_K
    }


#: the dead-latents sweep's lr, dictionary size and k
DEAD_LR, DEAD_N, DEAD_K = 8e-3, 4096, 32


def _dead_latents() -> dict[str, TrainConfig]:
    base = f"topk-n{DEAD_N}-k{DEAD_K}-lr{DEAD_LR:g}"
    arms = {"": {}, "-noauxk": {"auxk_alpha": 0.0}, "-noauxk-untied": {"auxk_alpha": 0.0, "tied_init": False}}
    recipe = TrainConfig(n_latents=DEAD_N, k=DEAD_K, lr=DEAD_LR)
    return {base + suffix: replace(recipe, **arm) for suffix, arm in arms.items()}


#: the lr sweep's k and its grid, as multiples of the paper's lr at each n (2x ... 16x, log-spaced)
LR_SWEEP_K = 32
LR_FACTORS = tuple(2 ** (1 + 0.75 * i) for i in range(5))
#: the name of the lr sweep (scored and fitted after training, see lr_sweep.py)
LR_SWEEP = "lr"
#: the ReLU lr sweep's dictionary sizes, L0 target and grid (multiples of the paper's lr at each n)
RELU_LR_N = (2048, 4096)
RELU_LR_L0 = 32
RELU_LR_FACTORS = tuple(2.0**i for i in range(5))
RELU_LR_SWEEP = "relu-lr"
#: the sweeps that are scored and fitted into an lr trend after training
LR_SWEEPS = (LR_SWEEP, RELU_LR_SWEEP)


def _lr_sweep() -> dict[str, TrainConfig]:
    presets = {}
    for n in SWEEP_N:
        for factor in LR_FACTORS:
            lr = float(f"{factor * paper_lr(n):.3g}")
            presets[f"topk-n{n}-k{LR_SWEEP_K}-lr{lr:.3g}"] = TrainConfig(n_latents=n, k=LR_SWEEP_K, lr=lr)
    return presets


def _relu_lr_sweep() -> dict[str, TrainConfig]:
    presets = {}
    for n in RELU_LR_N:
        for factor in RELU_LR_FACTORS:
            lr = float(f"{factor * paper_lr(n):.3g}")
            presets[f"relu-n{n}-l0{RELU_LR_L0}-lr{lr:.3g}"] = TrainConfig(
                activation="relu", n_latents=n, k=RELU_LR_L0, l1_target_l0=RELU_LR_L0, lr=lr
            )
    return presets


#: every preset by name
PRESETS: dict[str, TrainConfig] = {
    **_baseline(),
    **_fixed_lr(),
    **_dead_latents(),
    **_lr_sweep(),
    **_relu_lr_sweep(),
}
#: sweep name -> preset names, in training order
SWEEPS: dict[str, tuple[str, ...]] = {
    "baseline": tuple(_baseline()),
    "fixed-lr": tuple(_fixed_lr()),
    "dead-latents": tuple(_dead_latents()),
    LR_SWEEP: tuple(_lr_sweep()),
    RELU_LR_SWEEP: tuple(_relu_lr_sweep()),
}


def sweep(name: str, **overrides) -> dict[str, TrainConfig]:
    """The configs of sweep `name`, each with `overrides` applied (e.g. max_tokens=..., device=...)."""
    if name not in SWEEPS:
        raise KeyError(f"unknown sweep {name!r}; known: {sorted(SWEEPS)}")
    return {preset: replace(PRESETS[preset], **overrides) for preset in SWEEPS[name]}
