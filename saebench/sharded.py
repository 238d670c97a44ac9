"""`saebench run` under torchrun: the checkpoints spread over the ranks, their shared inputs collected once.

    torchrun --nproc-per-node N -m saebench run --checkpoint FOLDER ...

The checkpoints are those one process finds, in its order; rank r evaluates checkpoints r, r + N, r + 2N, ...

1. each rank reads each of its checkpoints (then drops it) for the site (model, layer) it is evaluated at
   and the metrics whose results are not filed yet;
2. every site any rank needs, in one order on every rank: each rank loads the model there, and the inputs
   every checkpoint there reads (the evaluation windows' residuals and each metric's `prepare`: downstream's
   clean pass, n2g's pools) are collected together, each rank a disjoint share of the cache's shards
   (`saebench.data.cache.collecting_together`), joined once;
3. each rank evaluates its checkpoints as one process does, reading those inputs from the cache, and files
   their results;
4. rank 0 gathers every rank's results and failures, in the checkpoints' order, for the summary.

The result files are one process's: the same windows, residuals (each shard is the same code on the same
rows, whichever rank runs it) and metrics.  What differs is what says when and where: the provenance's
`wall_time_s` and `created`, n2g's `details.seconds`, and on CUDA the device (cuda:LOCAL_RANK).

One checkpoint (a file, a folder of one, a remote one; not a built-in baseline) is a very wide SAE: its
latents are shared out instead (`saebench.sae.latent_shard`).  Steps 1 and 2 are the same on every rank;
in step 3 every rank reads the checkpoint, keeps its latent range and runs the metrics that allow it
(`Metric.latent_sharded`: core encodes and decodes across the shards, probes fit each rank's latents),
then rank 0 alone runs the others with the whole SAE (downstream, n2g, ...; every rank waits); rank 0 files
every result.  The files are one process's up to float rounding of the summed reconstructions.
"""

from __future__ import annotations

import sys
import time
import warnings
from datetime import timedelta

from saebench.data.cache import collecting_together
from saebench.metrics.registry import Metric
from saebench.ranks import Group, is_main
from saebench.results import reusable, write_result
from saebench.runner import CHECKPOINT_ERRORS, Checkpoint, Failure, Runner, _payload, discover
from saebench.sae.builtin import is_builtin
from saebench.sae.latent_shard import LatentShard

#: how long a rank waits at an exchange for the slowest one (ranks finish their checkpoints at their own pace)
WAIT_FOR_RANKS = timedelta(hours=24)

#: (model, layer, where the layer comes from for messages): where a checkpoint is evaluated
SiteKey = tuple


class ShardedRunner(Runner):
    """A `Runner` that is one rank of a torchrun launch (see the module docstring); rank 0's `run` returns
    every rank's results and holds every failure, the other ranks' return nothing."""

    def warn(self, message: str) -> None:
        if is_main():  # every rank comes across the run's warnings; one says them
            super().warn(message)

    def run(self) -> list[dict]:
        group = Group()
        self.failures = []
        checkpoints = discover(self.config.checkpoint, self.config.label)
        plan = self._plan()
        batch = len(checkpoints) > 1
        wide = not batch and not is_builtin(checkpoints[0].source)  # one SAE: its latents are shared out
        mine = [0] if wide else list(range(group.rank, len(checkpoints), group.world))
        needs: dict[SiteKey, set[str]] = {}
        for i in mine:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # said when it is evaluated
                    site, names = self.pending(checkpoints[i], plan, batch)
            except CHECKPOINT_ERRORS:
                continue  # evaluating it says why
            if names:
                needs.setdefault(site, set()).update(names)
        sites: dict[tuple, tuple[SiteKey, set[str]]] = {}
        for part in group.gather("sites", needs):
            for site, names in part.items():
                sites.setdefault(site[:2], (site, set()))[1].update(names)
        for site, names in sites.values():
            self.prepare(group, site, [step for step in plan if step[0].name in names])

        done: dict[int, list[dict] | Failure] = {}
        error = None
        for i in mine:
            ckpt = checkpoints[i]
            try:
                done[i] = (
                    self.evaluate_latent_sharded(group, ckpt, plan)
                    if wide
                    else self.evaluate(ckpt, plan, batch)
                )
            except CHECKPOINT_ERRORS as err:
                error = err
                done[i] = Failure(ckpt.label, ckpt.source, _first_line(err))
                if batch:
                    print(f"saebench: {ckpt.label} failed; going on with the others", file=sys.stderr)
        if wide:  # every rank evaluated it; rank 0's results and error are the run's
            done = done if is_main() else {}
        everything = {i: part for rank_done in group.gather("results", done) for i, part in rank_done.items()}
        if not is_main():
            return []
        if error is not None and not batch:  # one checkpoint (rank 0's): its error, as one process raises it
            raise error
        results = []
        for i in range(len(checkpoints)):
            part = everything[i]
            if isinstance(part, Failure):
                self.failures.append(part)
            else:
                results.extend(part)
        return results

    def evaluate_latent_sharded(self, group: Group, ckpt: Checkpoint, plan: list) -> list[dict]:
        """`evaluate` of one wide checkpoint on every rank: first the latent-sharded metrics on every rank
        (each holding its latents), then the others on rank 0 with the whole SAE; rank 0 files the results
        (in `plan`'s order) and returns them."""
        ckpt.identify()
        self.check_filing(ckpt, False)
        sae, context = self.load(ckpt)
        shard = LatentShard(sae, group)
        del sae  # rank 0 reads it again if a metric needs it whole
        filings = [self.filing(ckpt, context, metric, params, extra) for metric, params, extra in plan]
        # one decision for every rank (a rank that computes where another reuses would wait forever)
        reused = group.gather("reusable", [None if self.config.force else reusable(*f) for f in filings])[0]
        if is_main():
            print(
                f"evaluating {ckpt.label} ({', '.join(m.name for m, _, _ in plan)}) with its latents over "
                f"{group.world} ranks",
                file=sys.stderr,
            )
        results: dict[int, dict] = {i: old for i, old in enumerate(reused) if old is not None}
        whole = [i for i, (metric, _, _) in enumerate(plan) if i not in results and not metric.latent_sharded]
        for i, (metric, params, _) in enumerate(plan):
            if i in results or not metric.latent_sharded:
                continue
            t0 = time.perf_counter()
            result = metric.compute(context, shard, params)
            result.check_finite(metric.name, ckpt.source)
            if is_main():
                results[i] = self.file(metric, params, result, ckpt, shard, context, filings[i], t0)
        context.forget(shard)
        if is_main() and whole:
            sae, context = self.load(ckpt)
            for i in whole:
                metric, params, _ = plan[i]
                t0 = time.perf_counter()
                result = metric.compute(context, sae, params)
                result.check_finite(metric.name, ckpt.source)
                results[i] = self.file(metric, params, result, ckpt, sae, context, filings[i], t0)
            context.forget(sae)
        return [results[i] for i in sorted(results)] if is_main() else []

    def file(self, metric, params, result, ckpt, sae, context, filing, t0: float) -> dict:
        path, key = filing
        payload = _payload(metric, params, result, ckpt, sae, context, key, time.perf_counter() - t0)
        write_result(path, payload)
        return payload

    def pending(self, ckpt: Checkpoint, plan: list, batch: bool) -> tuple[SiteKey, list[str]]:
        """The site `ckpt` is evaluated at and the metrics of `plan` it has no reusable result of."""
        ckpt.identify()
        self.check_filing(ckpt, batch)
        if is_builtin(ckpt.source):
            site = (self.config.eval.model, self.config.eval.layer, None)
            context = self.builtin_context(ckpt)
        else:
            sae = self.read(ckpt)
            site = self.site_of(ckpt, sae)
            context = self.context_of(ckpt, sae)
            del sae
        names = [
            metric.name
            for metric, params, extra in plan
            if self.config.force or reusable(*self.filing(ckpt, context, metric, params, extra)) is None
        ]
        return site, names

    def prepare(self, group: Group, site: SiteKey, plan: list[tuple[Metric, object, dict]]) -> None:
        """Every rank loads the model at `site` and collects its share of the inputs `plan`'s metrics read
        there.  A step that fails on any rank ends the preparation of this site on every rank: the
        checkpoints there then collect what is missing, or fail, when they are evaluated."""
        model, layer, what = site
        steps = [("context", lambda: self.context_for(model, layer, what))]
        steps.append(("residuals", lambda: self.context_for(model, layer, what).resid))
        steps += [
            (m.name, _bound(m, self.contexts, (model, layer), params)) for m, params, _ in plan if m.prepare
        ]
        for name, step in steps:
            failed = None
            try:
                with collecting_together(group):
                    step()
            except CHECKPOINT_ERRORS as err:
                failed = _first_line(err)
            if any(f is not None for f in group.gather(f"prepared {name} at {model} layer {layer}", failed)):
                return


def _bound(metric: Metric, contexts: dict, key: tuple, params):
    return lambda: metric.prepare(contexts[key], params)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
