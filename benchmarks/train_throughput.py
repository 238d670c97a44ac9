"""Training throughput of the reference trainer's TopK step, beside EleutherAI's sparsify and dense autograd.

One step = forward + backward + Adam step + decoder renormalisation, on the same random (batch, d) inputs
and the same shapes.  Methods are timed in interleaved rounds (so load on a shared machine hits them
alike); printed: median tokens/s over --repeats rounds and the ratio to sparsify.  Also the encoder's
dense matmul (the chunked addmm that picks the top k) in GFLOP/s, as a fraction of one plain
torch.matmul of the same (batch x d) @ (d x n) shape.

    python benchmarks/train_throughput.py [--n 16384] [--k 32] [--d 576] [--batch 4096] [--repeats 5]
                                          [--device cpu]

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


def trainer_step_fn(d: int, n: int, k: int, batch: int, device: torch.device, sparse: bool, x: torch.Tensor):
    config = TrainConfig(n_latents=n, k=k, batch_size=batch, device=str(device), sparse_backward=sparse)
    trainer = Trainer(config, d)
    trainer.initialize(x[:1024])
    return trainer, lambda x: trainer.train_step(x)


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
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d, device=device)

    ours, ours_step = trainer_step_fn(args.d, args.n, args.k, args.batch, device, True, x)
    _, dense_step = trainer_step_fn(args.d, args.n, args.k, args.batch, device, False, x)
    config = ours.config
    methods = {"saebench sparse backward": ours_step, "dense autograd": dense_step}
    theirs = sparsify_step_fn(args.d, args.n, args.k, device, config.effective_lr(), config.adam_eps)
    if theirs is not None:
        methods["sparsify SparseCoder"] = theirs
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

    print(
        f"n={args.n} k={args.k} d={args.d} batch={args.batch} device={device} "
        f"threads={torch.get_num_threads()}"
    )
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    reference = rate.get("sparsify SparseCoder")
    for name, tokens_per_s in rate.items():
        ratio = f"{tokens_per_s / reference:5.2f}x sparsify" if reference else ""
        spread = f"[{args.batch / max(times[name]):,.0f} .. {args.batch / min(times[name]):,.0f}]"
        print(f"{name:26s} {tokens_per_s:10,.0f} tok/s  {spread:24s} {ratio}")
    ours_gflops, plain_gflops = encoder_matmul_fraction(ours, x, args.repeats, device)
    print(
        f"encoder matmul + top-k: {ours_gflops:.1f} GFLOP/s = {ours_gflops / plain_gflops:.2f} of plain "
        f"torch.matmul ({plain_gflops:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
