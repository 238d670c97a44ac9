"""`saebench explain --latent J`: which tokens' logits does ablating one latent lower and raise?

The view that makes the `ablation` metric's effects readable.  At the latent's `n_examples` top-activating
scored positions t of the evaluation windows, its raw-space contribution is subtracted from the true residual
at t only, exactly as the metric does (`saebench.metrics.ablation`), the model runs above the site on the
clean keys/values of the earlier positions, and the logit differences of positions t..t+T-1 are centred by
each row's median.  Shown per position: the context ending in the token at t, the activation, the effect's
sparsity score, and the tokens lowered and raised most as the next token (the row of position t) and summed
over the T positions; then, over all the positions shown, the mean next-token effect.

    saebench explain --checkpoint PATH --latent 123 [--examples 8] [--top-tokens 8] [--n-future 16]
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from saebench.context import EvalContext
from saebench.metrics.ablation import contributions, upper_cache
from saebench.sae.sae import SAE

TokenEffects = list[tuple[int, float]]


@dataclass
class Example:
    """One top-activating position and what ablating the latent there does."""

    window: int
    t: int
    activation: float
    #: token ids of the window up to and including t
    tokens: list[int]
    #: (||u||_1 / ||u||_2)^2 / (T' V) over the T' scored positions inside the window
    sparsity: float
    #: norm of the ablated raw-space contribution
    contribution_norm: float
    #: (token id, centred logit difference) at position t (the next token), most lowered / raised first
    lowered: TokenEffects
    raised: TokenEffects
    #: the same for the centred differences summed over positions t..t+T'-1
    lowered_future: TokenEffects
    raised_future: TokenEffects


@dataclass
class Explanation:
    latent: int
    #: scored evaluation positions where the latent is active, of how many
    active_positions: int
    positions: int
    n_future: int
    examples: list[Example] = field(default_factory=list)
    #: mean centred next-token logit difference over the examples
    lowered: TokenEffects = field(default_factory=list)
    raised: TokenEffects = field(default_factory=list)


def latent_activations(context: EvalContext, sae: SAE, latent: int) -> torch.Tensor:
    """The latent's activation at positions 1.. of the evaluation windows, (W, ctx - 1); 0 where unscored."""
    n_windows, ctx = context.windows.shape
    acts = torch.zeros(n_windows, ctx - 1)
    for start, stop, _, rec in context.reconstructions(sae).batches():
        codes = rec.codes
        a = (codes.values * (codes.indices == latent)).sum(-1).float().cpu()
        acts[start:stop] = a.reshape(stop - start, ctx - 1)
    return acts * torch.from_numpy(context.mask)


def _extremes(row: torch.Tensor, k: int) -> tuple[TokenEffects, TokenEffects]:
    low, high = row.topk(k, largest=False), row.topk(k)
    return (
        list(zip(low.indices.tolist(), low.values.tolist(), strict=True)),
        list(zip(high.indices.tolist(), high.values.tolist(), strict=True)),
    )


def explain_latent(
    context: EvalContext,
    sae: SAE,
    latent: int,
    *,
    n_examples: int = 8,
    top_tokens: int = 8,
    n_future: int = 16,
    batch: int = 4,
) -> Explanation:
    """Ablate `latent` at its top-activating positions and collect the logits it moves most."""
    if not 0 <= latent < sae.n_latents:
        raise ValueError(f"--latent {latent}: the SAE has latents 0..{sae.n_latents - 1}")
    acts = latent_activations(context, sae, latent)
    active = int((acts > 0).sum())
    out = Explanation(latent, active, int(context.mask.sum()), n_future)
    if active == 0:
        return out
    top = acts.flatten().topk(min(n_examples, active))
    windows, t = np.divmod(top.indices.numpy(), acts.shape[1])
    t = t + 1
    x = torch.from_numpy(np.array(context.resid[windows, t])).to(context.device, sae.W_enc.dtype)
    with torch.inference_mode():
        ids = torch.full((len(t), 1), latent, device=context.device)
        deltas = -contributions(sae, sae.encode_codes(x), ids)[:, 0]
    cache, rows = upper_cache(context, torch.from_numpy(windows))
    ctx, vocab = context.windows.shape[1], context.model.vocab_size
    next_token = torch.zeros(vocab, dtype=torch.float64)
    starts = torch.from_numpy(t).to(context.device)
    for lo in range(0, len(t), batch):
        sl = slice(lo, lo + batch)
        with torch.inference_mode():
            diff = cache.run_edits(
                rows[sl], starts[sl], deltas[sl], n_positions=n_future, output="logit_diff"
            )
        for i, d in enumerate(diff.double().cpu()):
            b = lo + i
            d = d[: min(n_future, ctx - int(t[b]))]  # rows past the window's end are NaN
            u = d - d.median(-1, keepdim=True).values
            sparsity = float(u.abs().sum() ** 2 / u.square().sum() / u.numel()) if u.any() else float("nan")
            lowered, raised = _extremes(u[0], top_tokens)
            lowered_f, raised_f = _extremes(u.sum(0), top_tokens)
            next_token += u[0]
            out.examples.append(
                Example(
                    window=int(windows[b]),
                    t=int(t[b]),
                    activation=float(top.values[b]),
                    tokens=context.windows[windows[b], : t[b] + 1].tolist(),
                    sparsity=sparsity,
                    contribution_norm=float(deltas[b].norm()),
                    lowered=lowered,
                    raised=raised,
                    lowered_future=lowered_f,
                    raised_future=raised_f,
                )
            )
    out.lowered, out.raised = _extremes(next_token / len(out.examples), top_tokens)
    return out


def format_explanation(expl: Explanation, tokenizer, *, label: str = "", context_tokens: int = 12) -> str:
    """Plain text: one block per example, then the mean next-token effect."""

    def tok(i: int) -> str:
        return repr(tokenizer.decode([i]))

    def effects(items: TokenEffects) -> str:
        return ", ".join(f"{tok(i)} {v:+.3f}" for i, v in items)

    share = expl.active_positions / max(expl.positions, 1)
    lines = [
        f"latent {expl.latent}{f' of {label}' if label else ''}: active at {expl.active_positions} of "
        f"{expl.positions} scored evaluation positions ({share:.2%}); ablated at its "
        f"{len(expl.examples)} top-activating positions, logit differences over t..t+{expl.n_future - 1} "
        "minus each row's median"
    ]
    if not expl.examples:
        return lines[0] + "\n  never active: nothing to ablate"
    for n, e in enumerate(expl.examples, 1):
        before = "".join(tokenizer.decode([i]) for i in e.tokens[-context_tokens:-1])
        text = f"...{before}[{tokenizer.decode([e.tokens[-1]])}]".replace("\n", "\\n")
        lines += [
            f"#{n} window {e.window}, t={e.t}: activation {e.activation:.3f}, |contribution| "
            f"{e.contribution_norm:.3f}, effect sparsity {e.sparsity:.4f}",
            f"   {text}",
            f"   next token  lowered: {effects(e.lowered)}",
            f"               raised:  {effects(e.raised)}",
            f"   summed over positions  lowered: {effects(e.lowered_future)}",
            f"                          raised:  {effects(e.raised_future)}",
        ]
    lines += [
        f"mean next-token effect over the {len(expl.examples)} positions",
        f"   lowered: {effects(expl.lowered)}",
        f"   raised:  {effects(expl.raised)}",
    ]
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _latent(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a latent index >= 0, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `explain` to the `saebench` subcommands; its handler is `cmd_explain` (set as `func`)."""
    from saebench.cli import _add_eval_args

    p = subparsers.add_parser(
        "explain",
        help="the tokens whose logits one latent's ablation lowers and raises most",
        description="Ablate one latent at its top-activating evaluation positions (as the ablation metric "
        "does) and show the next-token logits it lowers and raises most.",
    )
    p.add_argument("--checkpoint", required=True, help="one checkpoint file/folder, or builtin:NAME")
    p.add_argument("--latent", type=_latent, required=True, help="the latent's index")
    p.add_argument(
        "--examples", type=_positive, default=8, help="top-activating positions (default %(default)s)"
    )
    p.add_argument(
        "--top-tokens", type=_positive, default=8, help="tokens listed per side (default %(default)s)"
    )
    p.add_argument(
        "--n-future",
        type=_positive,
        default=16,
        help="positions t..t+T-1 of the effect (default %(default)s)",
    )
    p.add_argument("--context-tokens", type=_positive, default=12, help="context shown (default %(default)s)")
    p.add_argument("--format", default=None, help="override checkpoint format detection")
    _add_eval_args(p)
    p.set_defaults(func=cmd_explain)
    return p


def cmd_explain(args) -> int:
    from saebench.cli import _site_config
    from saebench.context import EvalConfig
    from saebench.runner import RunConfig, Runner, discover

    config = EvalConfig(**dataclasses.asdict(_site_config(args)), n_tokens=args.n_tokens)
    found = discover(args.checkpoint)
    if len(found) != 1:
        raise ValueError(f"--checkpoint {args.checkpoint}: explain takes one checkpoint, found {len(found)}")
    runner = Runner(
        RunConfig(
            checkpoint=args.checkpoint,
            metrics=[],
            eval=config,
            format=args.format,
            model_given=bool(args.model),
        )
    )
    sae, context = runner.load(found[0])
    if args.n_future >= context.config.ctx:
        raise ValueError(f"--n-future {args.n_future} must be below the window length {context.config.ctx}")
    expl = explain_latent(
        context,
        sae,
        args.latent,
        n_examples=args.examples,
        top_tokens=args.top_tokens,
        n_future=args.n_future,
    )
    print(
        format_explanation(
            expl, context.model.tokenizer, label=found[0].label, context_tokens=args.context_tokens
        )
    )
    return 0
