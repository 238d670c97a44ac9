"""Training throughput of the reference trainer's TopK step, beside EleutherAI's sparsify and dense autograd.

One step = forward (encoder matmul, top-k, AuxK when latents are dead) + backward + Adam step + decoder
gradient projection and renormalisation, on the same random (batch, d) inputs and the same shapes.

The floor: no TopK step can beat its own encoder forward matmul, the dense (batch x d) @ (d x n)
pre-activations it picks the top k from.  It is measured here, in the same process and in the same
interleaved rounds as the steps, as one plain torch.matmul of that shape: floor tok/s = batch / (median
time of that matmul).  Each step is printed as median tok/s over --repeats rounds, its fraction of the
floor (1.0 = the step costs no more than its encoder matmul) and its ratio to sparsify's step.  Also the
encoder's chunked matmul + top-k selection alone, in GFLOP/s, as a fraction of the same plain matmul.

--dead-fraction f marks the first f n latents dead before every step, so that AuxK (top-k_aux over the
dead latents' pre-activations, its encoder and decoder gradients) is part of the saebench steps timed; by
default no latent is dead (the benchmark's 5 + 1 steps are far below dead_tokens) and AuxK is idle.

    python benchmarks/train_throughput.py [--n 16384] [--k 32] [--d 576] [--batch 4096] [--repeats 5]
                                          [--device cpu] [--dead-fraction 0] [--no-dense]

sparsify's column needs `pip install --no-deps eai-sparsify einops natsort simple-parsing docstring-parser
schedulefree`; SPARSIFY_DISABLE_TRITON=1 is set here (its triton decoder fails on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from saebench.train import TrainConfig, Trainer

#: the timed method that is the floor (not a step)
FLOOR = "floor: plain encoder matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sparsify_step_fn(d: int, n: int, k: int, device: torch.device, lr: float, eps: float):
    """One sparsify SparseCoder training step (its own fvu loss, decoder constraint and Adam), or None."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception as err:  # noqa: BLE001 - any import-time failure means: no column
        print(f"sparsify: skipped, cannot import it ({type(err).__name__}: {err})")
        return None
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, eps=eps)

    def step(x: torch.Tensor) -> None:
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def trainer_step_fn(
    d: int, n: int, k: int, batch: int, device: torch.device, sparse: bool, x: torch.Tensor, dead: float
):
    config = TrainConfig(n_latents=n, k=k, batch_size=batch, device=str(device), sparse_backward=sparse)
    trainer = Trainer(config, d)
    trainer.initialize(x[:1024])
    n_dead = int(dead * n)

    def step(x: torch.Tensor) -> None:
        if n_dead:
            trainer.tokens_since_fired[:n_dead] = trainer.dead_tokens
        trainer.train_step(x)

    return trainer, step


def floor_fn(trainer: Trainer, x: torch.Tensor):
    """The floor's matmul: plain torch.matmul of the normalised batch (batch x d) by W_enc^T (d x n)."""
    u, _ = trainer.normalization.apply(x)
    weight = trainer.model.W_enc.detach()
    return lambda x: torch.matmul(u, weight.T)


def encoder_matmul_fraction(trainer: Trainer, x: torch.Tensor, repeats: int, device: torch.device):
    """(GFLOP/s of the trainer's chunked encoder matmul + top-k selection, GFLOP/s of plain matmul)."""
    model = trainer.model
    u, _ = trainer.normalization.apply(x)
    flops = 2 * u.shape[0] * model.d_in * model.n_latents

    def ours():
        model._select(u, None, model.config.k)

    def plain():
        torch.matmul(u, model.W_enc.detach().T)

    times = {ours: [], plain: []}
    for _ in range(repeats):
        for fn in (ours, plain):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[fn].append(time.perf_counter() - start)
    return flops / statistics.median(times[ours]) / 1e9, flops / statistics.median(times[plain]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=16384, help="latents")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--d", type=int, default=576, help="input width (SmolLM2-135M: 576)")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are printed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dead-fraction", type=float, default=0.0, help="latents kept dead (AuxK runs)")
    parser.add_argument("--no-dense", action="store_true", help="skip the (slow) dense-autograd step")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d, device=device)

    dead = args.dead_fraction
    ours, ours_step = trainer_step_fn(args.d, args.n, args.k, args.batch, device, True, x, dead)
    config = ours.config
    methods = {"saebench sparse backward": ours_step}
    if not args.no_dense:
        _, dense_step = trainer_step_fn(args.d, args.n, args.k, args.batch, device, False, x, dead)
        methods["dense autograd"] = dense_step
    theirs = sparsify_step_fn(args.d, args.n, args.k, device, config.effective_lr(), config.adam_eps)
    if theirs is not None:
        methods["sparsify SparseCoder"] = theirs
    methods[FLOOR] = floor_fn(ours, x)
    for step in methods.values():  # warm-up
        step(x)
    times = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, step in methods.items():
            sync(device)
            start = time.perf_counter()
            step(x)
            sync(device)
            times[name].append(time.perf_counter() - start)

    load = f" load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(
        f"n={args.n} k={args.k} d={args.d} batch={args.batch} device={device} "
        f"threads={torch.get_num_threads()} dead_fraction={dead}{load}"
    )
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    floor = rate.pop(FLOOR)
    reference = rate.get("sparsify SparseCoder")
    for name, tokens_per_s in rate.items():
        ratio = f"{tokens_per_s / reference:5.2f}x sparsify" if reference else ""
        spread = f"[{args.batch / max(times[name]):,.0f} .. {args.batch / min(times[name]):,.0f}]"
        fraction = f"{tokens_per_s / floor:5.2f} of floor"
        print(f"{name:26s} {tokens_per_s:10,.0f} tok/s  {spread:24s} {fraction}  {ratio}")
    flops = 2 * args.batch * args.d * args.n
    print(
        f"floor: the encoder forward matmul ({args.batch} x {args.d}) @ ({args.d} x {args.n}) at the plain "
        f"torch.matmul rate, {floor:,.0f} tok/s ({flops * floor / args.batch / 1e9:.1f} GFLOP/s)"
    )
    ours_gflops, plain_gflops = encoder_matmul_fraction(ours, x, args.repeats, device)
    print(
        f"encoder matmul + top-k: {ours_gflops:.1f} GFLOP/s = {ours_gflops / plain_gflops:.2f} of plain "
        f"torch.matmul ({plain_gflops:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
