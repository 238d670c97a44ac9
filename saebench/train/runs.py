"""Training named runs into a folder, resumably: `<out>/<name>/sae` (the checkpoint) and its state.

A run whose checkpoint says `complete` is skipped; a run with a training state resumes from it; any other
starts fresh.  A sweep is a list of runs over one shared activation stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

from saebench import ranks
from saebench.data.cache import atomic_write_bytes
from saebench.data.site import Site
from saebench.sae.formats.native import save_native
from saebench.sae.load import load_sae
from saebench.sae.sae import SAEInfo
from saebench.train.config import TrainConfig
from saebench.train.l1_search import MAX_TRIALS, TOLERANCE, Trial, accepted, closest, next_lambda
from saebench.train.lr_trend import choose_lr
from saebench.train.state import STATE_FILE
from saebench.train.stream import activation_stream, stream_length
from saebench.train.trainer import SAE_FOLDER, Trainer


def _say(message: str) -> None:
    """Progress lines, printed once (by rank 0 under torchrun)."""
    if ranks.is_main():
        print(message, file=sys.stderr)


def run_status(run_dir: Path) -> str:
    """'complete', 'partial' (a training state to resume from) or 'new'."""
    cfg = run_dir / SAE_FOLDER / "cfg.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("training", {}).get("complete"):
        return "complete"
    return "partial" if (run_dir / STATE_FILE).exists() else "new"


def train_runs(site: Site, configs: dict[str, TrainConfig], out: Path, n_tokens: int) -> list[Path]:
    """Train each named config on `n_tokens` training tokens at the site; return checkpoints.

    A ReLU config with `l1_target_l0` searches lambda (`search_l1`); every other config is one run.
    """
    out = Path(out)
    run_tokens = stream_length(site, n_tokens) if configs else 0
    done = []
    for name, config in configs.items():
        config = dataclasses.replace(config, max_tokens=run_tokens)
        if config.activation == "relu" and config.l1_target_l0 is not None:
            done.append(search_l1(site, name, config, out, n_tokens))
        else:
            done.append(train_run(site, name, config, out / name, n_tokens))
    return done


def train_run(site: Site, name: str, config: TrainConfig, run_dir: Path, n_tokens: int) -> Path:
    """One run into run_dir (skipped when complete, resumed when partial); returns its checkpoint."""
    status = run_status(run_dir)
    if status == "complete":
        _say(f"{name}: complete, skipped")
        return run_dir / SAE_FOLDER
    if status == "partial":
        trainer = Trainer.resume(run_dir, device=config.device, latent_shards=config.latent_shards)
        if trainer.config.max_tokens != config.max_tokens:
            raise ValueError(
                f"{run_dir} was started with {trainer.config.max_tokens} tokens, not {config.max_tokens}: "
                "use the same --n-tokens or another --out"
            )
        _say(f"{name}: resuming at {trainer.tokens_seen} tokens")
    else:
        info = SAEInfo(
            format="native",
            architecture=config.activation,
            model_name=site.config.model,
            layer=site.layer,
            site_name=f"resid_post.{site.layer}",
            context_size=site.config.ctx,
        )
        trainer = Trainer(config, site.model.d_model, out_dir=run_dir, info=info)
        _say(f"{name}: training on {config.max_tokens} tokens")
    trainer.fit(activation_stream(site, n_tokens, seed=config.seed))
    return run_dir / SAE_FOLDER


# --- the ReLU baseline's lambda search -------------------------------------------------------------------
#: folder (inside a sweep's out) holding the fixed-lambda trials, one subfolder per trial family
SEARCH_FOLDER = "l1-search"
#: fields that do not change a ReLU run's L0(lambda) curve: they name the trial or the target, or say where
#: and how it runs
_SEARCH_FREE = ("l1_coefficient", "l1_target_l0", "k", "device", "latent_shards")


def _family(config: TrainConfig) -> str:
    """Trials share a family when everything but lambda (and the target) is equal."""
    key = {f: v for f, v in config.to_dict().items() if f not in _SEARCH_FREE}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"relu-n{config.n_latents}-{digest}"


def _trials(folder: Path) -> dict[Trial, Path]:
    """Finished trials under one family folder, each with its checkpoint folder."""
    trials = {}
    for cfg in sorted(folder.glob(f"*/{SAE_FOLDER}/cfg.json")):
        training = json.loads(cfg.read_text()).get("training", {})
        if training.get("complete"):
            last = training["last_log"]
            trials[Trial(training["config"]["l1_coefficient"], last["l0"], last["nmse"])] = cfg.parent
    return trials


def _seed_key(config: dict) -> str:
    """What a family must share with another for its trials to seed that one's first lambda: everything
    but the dictionary size and the lr (and what never changes L0(lambda))."""
    free = (*_SEARCH_FREE, "n_latents", "lr", "lr_at_n")
    return json.dumps({f: v for f, v in config.items() if f not in free}, sort_keys=True)


def _start(out: Path, config: TrainConfig, target: float) -> float:
    """First lambda for a family without trials: from the trials of the nearest family that differs only
    in dictionary size and lr (nearest in log n first, then in log lr), e.g. the relu-lr sweep's trials
    for a baseline run trained into the same folder."""
    want, lr = _seed_key(config.to_dict()), choose_lr(config).lr
    candidates = []
    for folder in (out / SEARCH_FOLDER).glob("relu-n*-*"):
        if not (trials := _trials(folder)):
            continue
        training = json.loads((next(iter(trials.values())) / "cfg.json").read_text())["training"]
        if _seed_key(training["config"]) != want:
            continue
        distance = (
            abs(math.log(training["config"]["n_latents"] / config.n_latents)),
            abs(math.log(training["lr"] / lr)),
        )
        candidates.append((distance, folder.name, list(trials)))
    if not candidates:
        return config.l1_coefficient
    return next_lambda(min(candidates)[2], target, config.l1_coefficient)


def search_l1(site: Site, name: str, config: TrainConfig, out: Path, n_tokens: int) -> Path:
    """Fixed-lambda ReLU runs until one ends within TOLERANCE of config.l1_target_l0 (at most MAX_TRIALS
    new runs for this target); the closest is copied to out/name/sae with the search in its provenance."""
    run_dir = out / name
    if run_status(run_dir) == "complete":
        _say(f"{name}: complete, skipped")
        return run_dir / SAE_FOLDER
    target = config.l1_target_l0
    family = out / SEARCH_FOLDER / _family(config)
    log_file = run_dir / "l1_search.json"
    tried = json.loads(log_file.read_text())["tried"] if log_file.exists() else []
    start = _start(out, config, target)
    found = _trials(family)
    trials = list(found)
    while not any(accepted(t, target) for t in trials) and len(tried) < MAX_TRIALS:
        lam = float(f"{next_lambda(trials, target, start):.4g}")
        if any(t.l1_coefficient == lam for t in trials):
            break  # L0 is not monotone in lambda around here (run-to-run noise): no new run would help
        if lam not in tried:  # else a trial interrupted earlier, resumed below
            tried.append(lam)
            if ranks.is_main():
                atomic_write_bytes(log_file, json.dumps({"target_l0": target, "tried": tried}).encode())
        _say(f"{name}: lambda {lam:g} (trial {len(tried)} of at most {MAX_TRIALS})")
        trial = dataclasses.replace(config, l1_coefficient=lam)
        train_run(site, f"{name} lambda={lam:g}", trial, family / f"lambda-{lam:g}", n_tokens)
        found = _trials(family)
        trials = list(found)
    best = closest(trials, target)
    if not accepted(best, target):
        _say(
            f"{name}: no trial within {TOLERANCE}x of L0 {target:g}; using lambda {best.l1_coefficient:g} "
            f"(L0 {best.l0:.1f})"
        )
    sae = load_sae(found[best])
    training = dict(sae.info.extra["training"])
    training["config"] = {**training["config"], "l1_target_l0": target, "k": config.k}
    training["l1_search"] = {
        "target_l0": target,
        "tolerance": TOLERANCE,
        "chosen": best._asdict(),
        "trials": [t._asdict() for t in sorted(trials)],
    }
    if ranks.is_main():
        save_native(sae, run_dir / SAE_FOLDER, training=training)
    ranks.barrier()
    return run_dir / SAE_FOLDER
