"""Why latents stay dead: the dead fraction over training and whether AuxK could reach the dead latents.

For each trained run folder (`saebench train --out OUT` makes OUT/<preset>/ with sae/ and history.jsonl)
prints its lr, AuxK scale and init, the dead fraction over training (from history.jsonl, every `--every`
log lines) with AuxK's loss beside it, and then, on `--tokens` tokens of the training stream's start
(residuals at the site the checkpoint names, encoded by the trained SAE):

    silent      latents in no token's top-k on these tokens (the metric's "dead" on this sample)
    reachable   silent latents whose pre-activation is positive on at least one token: AuxK's top-k_aux
                over dead latents picks them and its ReLU passes their gradient
    unreachable silent latents negative on every token: AuxK's ReLU zeroes them, so its loss gives them no
                gradient and nothing else does either (TopK never selects them)

and, from the run's training_state.pt (read with weights_only=True), Adam's view of W_enc for dead and live
latents: the step per coordinate as a fraction of the lr (|m_hat| / sqrt(v_hat)), |m| and sqrt(v).  AuxK is
a dead latent's only gradient; when it is much smaller than the gradients the latent had while alive, Adam's
second moment (beta2 = 0.999: a ~1000-step memory) divides it by the old scale and the latent barely moves.

An AuxK loss of ~1 while latents are dead (its reconstruction of the error is ~0) says AuxK is not
reconstructing anything; the two readings above say whether the dead latents cannot be reached (negative
everywhere) or can, but are moved too little.

    python benchmarks/dead_latents.py RUN [RUN ...] [--tokens 16384] [--every 5] [--corpus C]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saebench.data.site import Site, SiteConfig
from saebench.sae.load import load_sae


def history(run: Path) -> list[dict]:
    path = run / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def reach(sae, x: torch.Tensor, chunk: int = 2048) -> dict[str, float]:
    """silent / reachable / unreachable fractions of latents on tokens x (see the module docstring)."""
    selected = torch.zeros(sae.n_latents, dtype=torch.bool)
    positive = torch.zeros(sae.n_latents, dtype=torch.bool)
    for lo in range(0, len(x), chunk):
        u, _ = sae.normalization.apply(x[lo : lo + chunk])
        pre = sae.pre_activations(u)
        top = pre.topk(sae.k, dim=1)
        selected[top.indices[top.values > 0]] = True
        positive |= (pre > 0).any(0)
    silent = ~selected
    return {
        "silent": float(silent.double().mean()),
        "reachable": float((silent & positive).double().mean()),
        "unreachable": float((silent & ~positive).double().mean()),
    }


def adam_view(run: Path, dead_tokens: int) -> dict[str, float] | None:
    """Adam's W_enc moments for dead vs live latents at the run's last checkpoint (None without a state)."""
    path = run / "training_state.pt"
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    dead = state["tokens_since_fired"] >= dead_tokens
    moments = state["optimizer"]["state"][0]  # W_enc, the first parameter
    m, v, t = moments["exp_avg"], moments["exp_avg_sq"], float(moments["step"])
    (beta1, beta2), eps = (
        state["optimizer"]["param_groups"][0]["betas"],
        state["optimizer"]["param_groups"][0]["eps"],
    )
    step = ((m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)).abs().mean(1)
    out = {"dead": float(dead.double().mean())}
    for name, rows in (("dead", dead), ("live", ~dead)):
        if rows.any():
            out[f"step_{name}"] = float(step[rows].mean())
            out[f"m_{name}"] = float(m[rows].abs().mean())
            out[f"sqrt_v_{name}"] = float(v[rows].sqrt().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--corpus", default=SiteConfig.corpus)
    args = p.parse_args()
    for run in args.runs:
        sae = load_sae(run / "sae")
        info = sae.info
        where = {"model": info.model_name, "layer": info.layer, "ctx": info.context_size}
        site = Site(SiteConfig(**where, corpus=args.corpus))
        x = site.train_sample(args.tokens)
        training = info.extra.get("training", {})
        config = training.get("config", {})
        print(
            f"{run}: lr {training.get('lr')}, auxk_alpha {training.get('auxk_alpha')}, "
            f"k_aux {training.get('k_aux')}, dead_tokens {training.get('dead_tokens')}, "
            f"tied_init {config.get('tied_init')}"
        )
        rows = history(run)
        for row in rows[:: args.every] + rows[-1:]:
            print(f"  step {row['step']:5d}  dead {row['dead_frac']:.3f}  auxk_nmse {row['auxk_nmse']:.3f}")
        adam = adam_view(run, training.get("dead_tokens", 0))
        if adam is not None and "step_dead" in adam and "step_live" in adam:
            print(
                f"  Adam on W_enc ({adam['dead']:.3f} dead): step/lr dead {adam['step_dead']:.4f} vs live "
                f"{adam['step_live']:.4f}; |m| dead {adam['m_dead']:.3g} vs live {adam['m_live']:.3g}; "
                f"sqrt(v) dead {adam['sqrt_v_dead']:.3g} vs live {adam['sqrt_v_live']:.3g}"
            )
        r = reach(sae, x)
        print(
            f"  on {len(x)} training tokens: silent {r['silent']:.3f} = reachable by AuxK "
            f"{r['reachable']:.3f} + unreachable (negative on every token) {r['unreachable']:.3f}"
        )


if __name__ == "__main__":
    main()
