"""Training named runs into a folder, resumably: `<out>/<name>/sae` (the checkpoint) and its state.

A run whose checkpoint says `complete` is skipped; a run with a training state resumes from it; any other
starts fresh.  A sweep is a list of runs over one shared activation stream.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from saebench.sae.sae import SAEInfo
from saebench.train.config import TrainConfig
from saebench.train.state import STATE_FILE
from saebench.train.stream import activation_stream, stream_length
from saebench.train.trainer import SAE_FOLDER, Trainer


def run_status(run_dir: Path) -> str:
    """'complete', 'partial' (a training state to resume from) or 'new'."""
    cfg = run_dir / SAE_FOLDER / "cfg.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("training", {}).get("complete"):
        return "complete"
    return "partial" if (run_dir / STATE_FILE).exists() else "new"


def train_runs(context, configs: dict[str, TrainConfig], out: Path, n_tokens: int) -> list[Path]:
    """Train each named config on `n_tokens` training tokens at the context's site; return checkpoints."""
    out = Path(out)
    done = []
    run_tokens = stream_length(context, n_tokens) if configs else 0
    for name, config in configs.items():
        run_dir = out / name
        status = run_status(run_dir)
        if status == "complete":
            print(f"{name}: complete, skipped", file=sys.stderr)
            done.append(run_dir / SAE_FOLDER)
            continue
        config = dataclasses.replace(config, max_tokens=run_tokens)
        if status == "partial":
            trainer = Trainer.resume(run_dir, device=config.device)
            if trainer.config.max_tokens != run_tokens:
                raise ValueError(
                    f"{run_dir} was started with {trainer.config.max_tokens} tokens, not {n_tokens}: "
                    "use the same --n-tokens or another --out"
                )
            print(f"{name}: resuming at {trainer.tokens_seen} tokens", file=sys.stderr)
        else:
            info = SAEInfo(
                format="native",
                architecture=config.activation,
                model_name=context.config.model,
                layer=context.layer,
                site_name=f"resid_post.{context.layer}",
                context_size=context.config.ctx,
            )
            trainer = Trainer(config, context.model.d_model, out_dir=run_dir, info=info)
            print(f"{name}: training on {run_tokens} tokens", file=sys.stderr)
        trainer.fit(activation_stream(context, n_tokens, seed=config.seed))
        done.append(run_dir / SAE_FOLDER)
    return done
