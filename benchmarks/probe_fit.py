"""Speed and agreement of the batched 1-D logistic fit against scikit-learn fitted one feature at a time.

Prints (a) the batched fit time for F features x (n_train + n_test) examples, median of --repeats runs;
(b) scikit-learn's default `LogisticRegression()` fitted in a loop over a sample of features, extrapolated
to F, and the ratio of the two; (c) the largest |test CE difference| against scikit-learn at tol=1e-10 on
the sample.  The features look like pooled SAE latents: most are zero on most examples, some carry a
label signal, some are constant.

    python benchmarks/probe_fit.py [--features 16384] [--n-train 256] [--n-test 256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from saebench.metrics.logistic import fit_logistic, standardize


def synthetic_latents(n: int, n_features: int, labels: np.ndarray, seed: int) -> np.ndarray:
    """Non-negative sparse features: each active on a random fraction of examples, some label-dependent."""
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.0, 0.6, n_features) ** 2
    signal = rng.normal(0, 1.5, n_features) * (rng.random(n_features) < 0.3)
    logits = np.log(rate / (1 - rate + 1e-9) + 1e-9)[None, :] + signal[None, :] * (2 * labels[:, None] - 1)
    active = rng.random((n, n_features)) < 1 / (1 + np.exp(-logits))
    return (active * rng.exponential(1.0, (n, n_features))).astype(np.float64)


def sklearn_test_ce(f_train, y_train, f_test, y_test, **kwargs) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(**kwargs).fit(f_train, y_train)
    z = clf.decision_function(f_test)
    return float(np.mean(np.logaddexp(0, z) - y_test * z))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--sample", type=int, default=512, help="features fitted by scikit-learn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the batched fit (sklearn: one core)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    rng = np.random.default_rng(0)
    n = args.n_train + args.n_test
    labels = rng.permutation(np.arange(n) % 2).astype(bool)
    x = synthetic_latents(n, args.features, labels, seed=1)
    y_train, y_test = labels[: args.n_train], labels[args.n_train :]
    train, test = standardize(
        torch.tensor(x[: args.n_train], dtype=dtype), torch.tensor(x[args.n_train :], dtype=dtype)
    )
    y_train_t, y_test_t = torch.tensor(y_train), torch.tensor(y_test)

    # batched runs alternate with slices of the scikit-learn loop: both see the same load on a shared machine
    sample = np.sort(rng.choice(args.features, size=min(args.sample, args.features), replace=False))
    train64, test64 = train.double().numpy(), test.double().numpy()
    times, per_feature = [], []
    for part in np.array_split(sample, args.repeats):
        start = time.perf_counter()
        fit = fit_logistic(train, y_train_t, l2=args.l2)
        test_ce = fit.test_ce(test, y_test_t)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with threadpool_limits(1):  # one core, like the batched fit
            for j in part:
                sklearn_test_ce(train64[:, j : j + 1], y_train, test64[:, j : j + 1], y_test)
        per_feature.append((time.perf_counter() - start) / len(part))
    batched, sklearn_each = statistics.median(times), statistics.median(per_feature)
    passes = fit.n_iter.double()
    print(
        f"(a) batched fit + test CE, {args.features} features x {n} examples ({args.n_train} train / "
        f"{args.n_test} test), {args.dtype}, {torch.get_num_threads()} thread(s): median "
        f"{batched * 1e3:.1f} ms of {args.repeats} (min {min(times) * 1e3:.1f}); Newton passes mean "
        f"{passes.mean():.2f}, max {int(passes.max())}; not converged {int((~fit.converged).sum())}"
    )
    extrapolated = sklearn_each * args.features
    print(
        f"(b) sklearn LogisticRegression() defaults, loop over {len(sample)} features in {args.repeats} "
        f"parts: median {sklearn_each * 1e3:.2f} ms/feature -> {extrapolated:.1f} s for {args.features}; "
        f"batched is {extrapolated / batched:.0f}x faster"
    )

    c = 1 / (args.l2 * args.n_train)
    worst = 0.0
    for j in sample:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref = sklearn_test_ce(
                train64[:, j : j + 1], y_train, test64[:, j : j + 1], y_test,
                C=c, solver="lbfgs", tol=1e-10, max_iter=10000,
            )  # fmt: skip
        worst = max(worst, abs(ref - float(test_ce[j])))
    # (lbfgs may stop with status ABNORMAL at tol=1e-10 when it cannot improve further; its answer stands)
    print(f"(c) max |test CE - sklearn(C=1/(l2 n), tol=1e-10)| over {len(sample)} features: {worst:.2e}")


if __name__ == "__main__":
    main()
