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

A single very wide SAE would shard its latents over the ranks here instead of the checkpoints: step 2 is
the same, and step 3 runs the metric on every rank with its share of the latents (not built yet).
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta

from saebench.data.cache import collecting_together
from saebench.metrics.registry import Metric
from saebench.ranks import Group, is_main
from saebench.results import reusable
from saebench.runner import CHECKPOINT_ERRORS, Checkpoint, Failure, Runner, discover
from saebench.sae.builtin import is_builtin

#: how long a rank waits at an exchange for the slowest one (ranks finish their checkpoints at their own pace)
WAIT_FOR_RANKS = timedelta(hours=24)

#: (model, layer, where the layer comes from for messages): where a checkpoint is evaluated
Site = tuple


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
        mine = list(range(group.rank, len(checkpoints), group.world))
        needs: dict[Site, set[str]] = {}
        for i in mine:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # said when it is evaluated
                    site, names = self.pending(checkpoints[i], plan, batch)
            except CHECKPOINT_ERRORS:
                continue  # evaluating it says why
            if names:
                needs.setdefault(site, set()).update(names)
        sites: dict[tuple, tuple[Site, set[str]]] = {}
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
                done[i] = self.evaluate(ckpt, plan, batch)
            except CHECKPOINT_ERRORS as err:
                error = err
                done[i] = Failure(ckpt.label, ckpt.source, _first_line(err))
                if batch:
                    print(f"saebench: {ckpt.label} failed; going on with the others", file=sys.stderr)
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

    def pending(self, ckpt: Checkpoint, plan: list, batch: bool) -> tuple[Site, list[str]]:
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

    def prepare(self, group: Group, site: Site, plan: list[tuple[Metric, object, dict]]) -> None:
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
