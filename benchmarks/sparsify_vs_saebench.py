"""This trainer's defaults beside eai-sparsify 1.3.3's, on the same activation stream, scored alike.

Both train a TopK SAE with n latents and k active on the same training tokens: the activation stream
`saebench train` uses (`saebench.train.stream.activation_stream`: the site's cached training-split
residuals, position 0 and separators dropped, shuffled with the same seed), cut into the same batches.

    saebench   `saebench train`'s defaults (TrainConfig with n_latents, k, batch_size): layer-norm inputs,
               b_pre at the geometric median, tied init, AuxK, Adam at the lr its rule gives (the fitted
               trend where one applies, else the paper's 1/sqrt(n); printed with its source)
    sparsify   sparsify's Trainer recipe, replayed step for step: SparseCoder(d, SparseCoderConfig(
               num_latents=n, k=k)), b_dec = the first batch's mean, decoder rows renormalised before
               every forward, loss = fvu (auxk_alpha defaults to 0: no AuxK), gradient parallel to the
               decoder rows removed, ScheduleFreeWrapper(SignSGD, momentum 0.95) at its default lr
               5e-3 / sqrt(n / 2^14), the schedule-free average (optimizer.eval()) saved as sparsify
               saves it (its decoder rows are then a little off unit norm: the loader warns); raw inputs

Each checkpoint is then evaluated by the runner (`saebench run --tasks core,downstream`'s code) on the
evaluation split's windows, and the table prints nmse (in each SAE's own input space: layer-normed for
saebench, raw for sparsify), fvu_raw (raw space, comparable), the dead fraction on the evaluation tokens,
delta_ce and kl, with each trainer's training wall time.  Checkpoints and results stay in --out; a rerun
reuses the finished saebench run and the results (pass --force to retrain and rescore both).

    SPARSIFY_DISABLE_TRITON=1 python benchmarks/sparsify_vs_saebench.py [--n-tokens 500000] [--n 4096]
        [--k 32] [--batch 1024] [--eval-tokens 16384] [--device cpu] [--out bench-out/sparsify_vs_saebench]
        [--model smollm2-135m] [--layer L] [--corpus C] [--ctx 128] [--cache-dir DIR]

sparsify needs `make setup-peers` (or `pip install --no-deps eai-sparsify einops natsort simple-parsing
docstring-parser schedulefree`); SPARSIFY_DISABLE_TRITON=1 is set here (its triton decoder fails on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from saebench.data.site import Site, SiteConfig
from saebench.train.batches import rebatch
from saebench.train.config import TrainConfig
from saebench.train.lr_sweep import score_checkpoint, score_values
from saebench.train.runs import train_runs
from saebench.train.stream import activation_stream, stream_length

COLUMNS = (
    ("core.nmse", "nmse"),
    ("core.fvu_raw", "fvu_raw"),
    ("core.dead_frac", "dead"),
    ("downstream.delta_ce", "delta_ce"),
    ("downstream.kl", "kl"),
)


def sparsify_lr(n: int) -> float:
    """sparsify's Trainer default for optimizer='signum' (its default optimizer) when lr is unset."""
    return 5e-3 / (n / 2**14) ** 0.5


def train_sparsify(site: Site, n: int, k: int, batch: int, n_tokens: int, folder: Path, seed: int) -> dict:
    """sparsify's default recipe on the saebench stream; the SAE saved to folder (sparsify's layout)."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    device = torch.device(site.config.device)
    torch.manual_seed(seed)  # sparsify's Trainer seeds before building each SparseCoder
    sae = SparseCoder(site.model.d_model, SparseCoderConfig(num_latents=n, k=k), device, dtype=torch.float32)
    lr = sparsify_lr(n)
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    optimizer.train()
    max_tokens = stream_length(site, n_tokens)
    started, steps, seen = time.perf_counter(), 0, 0
    for x in rebatch(activation_stream(site, n_tokens, seed=seed), batch):
        if seen >= max_tokens:
            break
        x = x.to(device)
        if steps == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        steps, seen = steps + 1, seen + x.shape[0]
    optimizer.eval()  # the schedule-free average is the model sparsify saves
    wall = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    sae.save_to_disk(folder)
    record = {
        "lr": lr,
        "lr_source": "sparsify default (signum)",
        "steps": steps,
        "tokens": seen,
        "wall_s": wall,
    }
    (folder.parent / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    d = SiteConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-tokens", type=int, default=500_000, help="training tokens per trainer")
    parser.add_argument("--n", type=int, default=4096, help="latents")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per optimizer step")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out evaluation tokens")
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--layer", type=int, default=None, help="default: the model's default site")
    parser.add_argument("--corpus", default=d.corpus)
    parser.add_argument("--ctx", type=int, default=d.ctx)
    parser.add_argument("--cache-dir", default=None, help="activation cache (default $SAEBENCH_CACHE)")
    parser.add_argument("--seed", type=int, default=0, help="stream order and both initialisations")
    parser.add_argument("--out", default="bench-out/sparsify_vs_saebench", help="checkpoints and results")
    parser.add_argument("--force", action="store_true", help="retrain and rescore both")
    args = parser.parse_args(argv)

    site = Site(
        SiteConfig(
            model=args.model,
            layer=args.layer,
            corpus=args.corpus,
            ctx=args.ctx,
            device=args.device,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
    )
    out = Path(args.out) / f"n{args.n}-k{args.k}-b{args.batch}-t{args.n_tokens}"
    if args.force:
        shutil.rmtree(out, ignore_errors=True)

    ours_config = TrainConfig(
        n_latents=args.n, k=args.k, batch_size=args.batch, device=args.device, seed=args.seed
    )
    started = time.perf_counter()
    (ours,) = train_runs(site, {"saebench": ours_config}, out, args.n_tokens)
    ours_training = json.loads((ours / "cfg.json").read_text())["training"]
    print(f"saebench: trained in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    theirs_folder = out / "sparsify" / f"layers.{site.layer}"
    record_file = out / "sparsify" / "training.json"
    if record_file.is_file() and (theirs_folder / "sae.safetensors").is_file():
        theirs_training = json.loads(record_file.read_text())
    else:
        theirs_training = train_sparsify(
            site, args.n, args.k, args.batch, args.n_tokens, theirs_folder, args.seed
        )

    rows = {
        "saebench": {
            "lr": ours_training["lr"],
            "lr_source": ours_training.get("lr_source", "?"),
            "wall_s": ours_training["wall_time_s"],
            "tokens": ours_training["tokens_seen"],
            **score_values(
                score_checkpoint(site, ours, out / "scores", "saebench", args.eval_tokens, validation=False)
            ),
        },
        "sparsify": {
            "lr": theirs_training["lr"],
            "lr_source": theirs_training["lr_source"],
            "wall_s": theirs_training["wall_s"],
            "tokens": theirs_training["tokens"],
            **score_values(
                score_checkpoint(
                    site, theirs_folder, out / "scores", "sparsify", args.eval_tokens, validation=False
                )
            ),
        },
    }
    print(
        f"n={args.n} k={args.k} batch={args.batch}, {rows['saebench']['tokens']} training tokens, "
        f"{args.eval_tokens} evaluation tokens, {site.config.model} layer {site.layer}"
    )
    header = f"{'trainer':<10}{'lr':>10}" + "".join(f"{name:>10}" for _, name in COLUMNS) + f"{'train s':>10}"
    print(header)
    for trainer, row in rows.items():
        cells = "".join(f"{row[key]:>10.4f}" for key, _ in COLUMNS)
        print(f"{trainer:<10}{row['lr']:>10.3g}{cells}{row['wall_s']:>10.1f}   lr: {row['lr_source']}")
    print("nmse is in each SAE's input space (saebench: layer-normed; sparsify: raw); fvu_raw compares both")
    (out / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
