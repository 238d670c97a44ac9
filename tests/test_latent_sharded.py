"""`torchrun -m saebench run` with one checkpoint on 2 gloo ranks: its latents shared out (core encodes and
decodes across the shards, probes fit each rank's latents, downstream runs on rank 0 with the whole SAE),
and the result files those of one process: every integer and string equal (L0 counts, dead latents, each
task's chosen latent), every float within REL of one process's (the summed reconstructions round apart)."""

from __future__ import annotations

import math
import random
import sys
import time

import pandas as pd
import pytest
import torch

from saebench.sae.formats.native import save_native
from tests.conftest import random_sae, write_corpus
from tests.test_sharded import PRELUDE, TORCHRUN, launch, result_files

#: relative tolerance on floats (float32 reconstructions summed over 2 ranks in another order than one
#: process's decode; the largest difference seen here is printed by the test)
REL = 1e-5
#: tiny numbers near 0 (an interval end of a difference) compare absolutely
ABS = 1e-9
TASKS = ("tiny_halves", "tiny_halves_max", "tiny_halves_last", "tiny_long")


def _tasks(folder):
    """Four tiny probe tasks: words over one half of the alphabet or the other (mean, max, last pooling),
    and more than one word or not (mean)."""
    rng = random.Random(0)
    rows = []
    for i in range(56):
        letters = "abcdefghijklm" if i % 2 == 0 else "nopqrstuvwxyz"
        words = [
            "".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(1, 3))
        ]
        rows.append({"prompt": " ".join(words), "target": i % 2 == 0, "long": len(words) > 1})
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "halves.csv", index=False)
    common = "source: halves.csv\ntext_column: prompt\nlabel_column: target\npositive_label: true\n"
    common += "n_train: 32\nn_test: 20\nmax_tokens: 10\n"
    for name, pool in zip(TASKS, ("mean", "max", "last"), strict=False):
        (folder / f"{name}.yaml").write_text(common + f"pool: {pool}\n")
    (folder / "tiny_long.yaml").write_text(common.replace("label_column: target", "label_column: long"))
    return folder


def wide_sae(activation: str):
    """96 latents (TopK: k = 4); latent 44 (TopK's best on the halves tasks) moved to 92, on rank 1's half,
    so the tasks' best latents lie on both ranks (the long task's is 6)."""
    sae = random_sae(64, 96, activation=activation, k=4, seed=3)
    order = torch.arange(96)
    order[[44, 92]] = order[[92, 44]]
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc[:, order])
        sae.b_enc.copy_(sae.b_enc[order])
        sae.W_dec.copy_(sae.W_dec[order])
    return sae


@pytest.fixture(scope="module", params=["topk", "relu"])
def setup(request, tmp_path_factory, tiny_llama):
    """TopK: a global top-k over the ranks' candidates; ReLU: the union of the ranks' active latents."""
    root = tmp_path_factory.mktemp(f"latent_sharded_{request.param}")
    tiny_llama.hf_model.save_pretrained(root / "model")
    tiny_llama.tokenizer.save_pretrained(root / "model")
    save_native(wide_sae(request.param), root / "wide")
    (root / "prelude.py").write_text(PRELUDE)
    args = ["run", "--checkpoint", str(root / "wide"), "--model", str(root / "model"), "--layer", "1"]
    args += ["--corpus", str(write_corpus(root / "corpus.txt")), "--n-tokens", "600", "--ctx", "16"]
    args += [
        "--batch-size",
        "4",
        "--tasks",
        "core,downstream,probes",
        "--include-tasks",
        str(_tasks(root / "t")),
    ]
    args += ["--probe-tasks", ",".join(TASKS)]
    t0 = time.perf_counter()
    one = launch(root, [sys.executable], args, "one")
    return root, args, one, time.perf_counter() - t0, request.param


def differences(want, got, where=""):
    """(paths that differ beyond the tolerance, largest relative difference of floats)."""
    if isinstance(want, dict) and isinstance(got, dict):
        if sorted(want) != sorted(got):
            return [f"{where}: keys {sorted(want)} != {sorted(got)}"], 0.0
        out, worst = [], 0.0
        for key in want:
            bad, w = differences(want[key], got[key], f"{where}.{key}")
            out += bad
            worst = max(worst, w)
        return out, worst
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        out, worst = [], 0.0
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            bad, w = differences(a, b, f"{where}[{i}]")
            out += bad
            worst = max(worst, w)
        return out, worst
    if isinstance(want, float) and isinstance(got, float):
        rel = abs(want - got) / max(abs(want), 1e-300)
        ok = math.isclose(want, got, rel_tol=REL, abs_tol=ABS) or (math.isnan(want) and math.isnan(got))
        return ([] if ok else [f"{where}: {want} != {got}"]), (rel if abs(want - got) > ABS else 0.0)
    return ([] if want == got else [f"{where}: {want!r} != {got!r}"]), 0.0


@pytest.mark.slow  # ~45 s per activation here: one process, then torchrun with 2 ranks
def test_one_wide_checkpoint_over_two_ranks_gives_the_result_files_of_one_process(setup):
    root, args, (one, one_out, _), one_s, activation = setup
    t0 = time.perf_counter()
    two, two_out, _ = launch(root, TORCHRUN, args, "two")
    print(f"wall time: one process {one_s:.1f} s, 2 ranks {time.perf_counter() - t0:.1f} s")
    for done in (one, two):
        assert done.returncode == 0, done.stderr[-3000:]
    assert "with its latents over 2 ranks" in two.stderr
    want, got = result_files(one_out), result_files(two_out)
    assert sorted(want) == [f"wide/{m}.json" for m in ("core", "downstream", "probes")]
    for files in (want, got):  # timings
        del files["wide/probes.json"]["details"]["timing"]
    bad, worst = differences(want, got)
    print(f"largest relative difference of a float: {worst:.2e}")
    assert not bad, bad[:10]
    # the chosen latents come from both ranks' halves, so the ranks' choice is exercised both ways
    chosen = {task["latent"] for task in want["wide/probes.json"]["details"]["tasks"].values()}
    print(f"chosen latents: {sorted(chosen)}")
    if activation == "topk":
        assert min(chosen) < 48 <= max(chosen)
    assert two.stdout.count("\nresults:") == 1
    assert two.stdout.split("\nresults:")[0] == one.stdout.split("\nresults:")[0]
