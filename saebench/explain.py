"""`saebench explain --latent J [--latent K ...]`: what does a latent fire on, and what does it do?

Per latent: its firing rate, its N2G explanation (the `n2g` metric's token patterns, with their precision
and recall on the held-out pool: taken from the `n2g` result file under `--results` when that file is
current and explains the latent, else computed for the asked latents only), and the ablation view below.

The ablation view makes the `ablation` metric's effects readable.  At the latent's `n_examples` top-activating
scored positions t of the evaluation windows, its raw-space contribution is subtracted from the true residual
at t only, exactly as the metric does (`saebench.metrics.ablation`), the model runs above the site on the
clean keys/values of the earlier positions, and the logit differences of positions t..t+T-1 are centred by
each row's median.  Shown per position: the context ending in the token at t, the activation, the effect's
sparsity score, and the tokens lowered and raised most as the next token (the row of position t) and summed
over the T positions; then, over all the positions shown, the mean next-token effect.

    saebench explain --checkpoint PATH --latent 123 [--latent 456] [--examples 8] [--top-tokens 8]
        [--n-future 16] [--results results]
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from saebench.context import EvalContext
from saebench.metrics.ablation import contributions, upper_cache
from saebench.metrics.n2g import N2GParams, explain_latents
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


def n2g_rows(
    context: EvalContext, sae: SAE, latents: list[int], cached: dict | None, params: N2GParams | None = None
) -> dict[int, dict]:
    """Per latent, its N2G row: from `cached` (an n2g result's rows by latent) where present, else computed
    for the missing latents only (`explain_latents`, by default with the metric's default parameters)."""
    cached = cached or {}
    rows = {j: {**cached[j], "source": "n2g result file"} for j in latents if j in cached}
    missing = [j for j in latents if j not in rows]
    if missing:
        for row in explain_latents(context, sae, missing, params or N2GParams()):
            rows[row["latent"]] = {**row, "source": "computed now"}
    return rows


def format_n2g(row: dict) -> str:
    """Two lines: held-out precision / recall beside the token lookup's, and the patterns."""
    head = (
        f"N2G ({row['source']}): precision {row['precision']:.3f}, recall {row['recall']:.3f}, "
        f"f1 {row['f1']:.3f} on held-out text (token lookup: precision {row['precision_token']:.3f}, "
        f"recall {row['recall_token']:.3f}); {row['n_patterns']} patterns, largest build activation "
        f"{row['a_max']:.3f}"
    )
    text = row["explanation"].replace("\n", "\\n") or "(no pattern: every record's tokens were wildcards)"
    return f"{head}\n   {text}"


def format_explanation(
    expl: Explanation, tokenizer, *, label: str = "", context_tokens: int = 12, n2g: dict | None = None
) -> str:
    """Plain text: the N2G explanation (if given), one block per example, then the mean next-token effect."""

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
    if n2g is not None:
        lines.append(format_n2g(n2g))
    if not expl.examples:
        return "\n".join(lines) + "\n  never active: nothing to ablate"
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
    p.add_argument(
        "--latent", type=_latent, action="append", required=True, help="a latent's index (repeatable)"
    )
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
    p.add_argument(
        "--results",
        default="results",
        help="where `saebench run --out` put result files: a current n2g.json there is reused "
        "(default %(default)s)",
    )
    p.add_argument("--no-n2g", action="store_true", help="skip the N2G explanation")
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
    ckpt = found[0]
    sae, context = runner.load(ckpt)
    if args.n_future >= context.config.ctx:
        raise ValueError(f"--n-future {args.n_future} must be below the window length {context.config.ctx}")
    latents = list(dict.fromkeys(args.latent))
    for j in latents:
        if j >= sae.n_latents:
            raise ValueError(f"--latent {j}: the SAE has latents 0..{sae.n_latents - 1}")
    n2g = {} if args.no_n2g else n2g_rows(context, sae, latents, cached_n2g(args.results, ckpt, context))
    blocks = []
    for j in latents:
        expl = explain_latent(
            context, sae, j, n_examples=args.examples, top_tokens=args.top_tokens, n_future=args.n_future
        )
        text = format_explanation(
            expl,
            context.model.tokenizer,
            label=ckpt.label,
            context_tokens=args.context_tokens,
            n2g=n2g.get(j),
        )
        blocks.append(text)
    print("\n\n".join(blocks))
    return 0


def cached_n2g(results: str, ckpt, context: EvalContext) -> dict[int, dict]:
    """The rows by latent of `<results>/<label>/n2g.json` if that file is current for this checkpoint,
    evaluation data and the metric's default parameters; else {}."""
    from pathlib import Path

    from saebench.metrics.registry import get_metric, params_dict
    from saebench.results import result_key, result_path, reusable

    metric = get_metric("n2g")
    key = result_key("n2g", metric.version, params_dict(N2GParams()), ckpt.sha256, context.data_key)
    found = reusable(result_path(Path(results), ckpt.label, "n2g"), key)
    if found is None:
        return {}
    return {int(row["latent"]): row for row in found.get("details", {}).get("latents", [])}
