"""N2G explanations: token patterns, the trie that holds them, and prediction over many windows at once.

A pattern is a token sequence ending at the activating token, read backwards from it: exact tokens and
wildcards `*` (exactly one token of any kind), optionally anchored `^` at its start (the token before it must
be the start of a context: position 0 of a window or a BOS/EOS separator).  A latent's explanation is a trie
keyed from the last token backwards; a node where a pattern ends keeps the largest activation seen for it
(separately for the anchored and the free form).

Prediction at position t: walk the trie backwards from the token at t, exact child before wildcard child; the
prediction is the value of the longest complete match, else 0.  Ties in length go to the anchored form, then
to the path that is exact at the earliest step back.  `Trie.walk` is that walk, one position at a time;
`predict` gives the same numbers for every position of many windows and many tries at once by hashing, per
pattern shape (length, wildcard places, anchor), the windows' n-grams at the shape's exact offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

WILDCARD = -1


@dataclass(frozen=True)
class Pattern:
    """tokens: forward order, the last one the activating token; WILDCARD (-1) for `*`."""

    tokens: tuple[int, ...]
    anchored: bool
    value: float

    @property
    def shape(self) -> tuple[int, bool, tuple[bool, ...]]:
        """(length, anchored, exact flags from the last token backwards): what one hash pass covers."""
        return len(self.tokens), self.anchored, tuple(t != WILDCARD for t in reversed(self.tokens))

    def priority(self) -> tuple:
        """Larger wins: longer, then anchored, then exact at the earliest step back (the walk's order)."""
        return (len(self.tokens), self.anchored, self.shape[2])

    def text(self, decode) -> str:
        """Readable form, e.g. `^ the [United]`: `decode(id) -> str`, the activating token in brackets."""
        parts = ["*" if t == WILDCARD else repr(decode(t))[1:-1] for t in self.tokens]
        parts[-1] = f"[{parts[-1]}]"
        return " ".join((["^"] if self.anchored else []) + parts)


@dataclass
class Node:
    children: dict[int, Node] = field(default_factory=dict)
    #: largest activation of a free / anchored pattern ending here, None if none
    end: float | None = None
    end_anchored: float | None = None


class Trie:
    """The patterns of one latent, keyed from the last token backwards."""

    def __init__(self, patterns: Sequence[Pattern] = ()):
        self.root = Node()
        for p in patterns:
            self.insert(p)

    def insert(self, pattern: Pattern) -> None:
        if not pattern.tokens:
            raise ValueError("a pattern needs at least one token")
        node = self.root
        for t in reversed(pattern.tokens):
            node = node.children.setdefault(int(t), Node())
        attr = "end_anchored" if pattern.anchored else "end"
        old = getattr(node, attr)
        setattr(node, attr, pattern.value if old is None else max(old, pattern.value))

    def patterns(self) -> list[Pattern]:
        """Every distinct pattern with its leaf value."""
        out: list[Pattern] = []

        def visit(node: Node, back: list[int]) -> None:
            tokens = tuple(reversed(back))
            if node.end is not None:
                out.append(Pattern(tokens, False, node.end))
            if node.end_anchored is not None:
                out.append(Pattern(tokens, True, node.end_anchored))
            for t, child in node.children.items():
                visit(child, back + [t])

        visit(self.root, [])
        return out

    def walk(self, tokens: Sequence[int], t: int, starts: Sequence[int] = (0,)) -> float:
        """Prediction at position t of one window `tokens`; `starts`: token ids that begin a context.

        Position 0 is never part of a pattern (it is the window's BOS); a pattern may start at 1.
        """
        best: tuple[tuple, float] | None = None

        def visit(node: Node, depth: int, exact: tuple[bool, ...]) -> None:
            nonlocal best
            first = t - depth + 1  # position of the pattern's first token if it ended here
            if depth > 0:
                before = first - 1
                anchor_ok = before == 0 or tokens[before] in starts
                for value, anchored in ((node.end, False), (node.end_anchored, True)):
                    if value is None or (anchored and not anchor_ok):
                        continue
                    key = (depth, anchored, exact)
                    if best is None or key > best[0]:
                        best = (key, value)
            position = t - depth
            if position < 1:
                return
            token = int(tokens[position])
            if token in node.children:
                visit(node.children[token], depth + 1, exact + (True,))
            if WILDCARD in node.children:
                visit(node.children[WILDCARD], depth + 1, exact + (False,))

        visit(self.root, 0, ())
        return 0.0 if best is None else best[1]


#: odd 64-bit multipliers of the n-gram hash, one per step back
_MULTIPLIERS = np.random.default_rng(12345).integers(1, 2**62, size=4096).astype(np.uint64) | np.uint64(1)


def predict(tries: Sequence[Trie], windows: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """Predictions (n_windows, ctx, len(tries)) float64 of every trie at every position (0 at position 0).

    For each pattern shape, one hash of the windows' tokens at the shape's exact offsets; patterns whose
    hash matches are checked token by token (no collision survives), and a match overwrites the prediction
    where its priority beats the one already there, so the result equals `Trie.walk` everywhere.
    """
    windows = np.asarray(windows, dtype=np.int64)
    n_windows, ctx = windows.shape
    out = np.zeros((n_windows, ctx, len(tries)))
    by_shape: dict[tuple, list[tuple[int, Pattern]]] = {}
    for j, trie in enumerate(tries):
        for p in trie.patterns():
            by_shape.setdefault(p.shape, []).append((j, p))
    if not by_shape:
        return out
    # global rank of every pattern by priority, so one integer per (position, trie) says who wins
    ranked = sorted({p.priority() for group in by_shape.values() for _, p in group})
    rank_of = {key: r + 1 for r, key in enumerate(ranked)}
    best = np.zeros((n_windows, ctx, len(tries)), dtype=np.int64)
    is_start = np.isin(windows, np.asarray(list(starts), dtype=np.int64))
    is_start[:, 0] = True
    tok = windows.astype(np.uint64)
    for (length, anchored, exact), group in by_shape.items():
        if length > ctx - 1:
            continue
        ends = np.arange(length, ctx)  # pattern occupies end-length+1 .. end >= 1
        h = np.zeros((n_windows, len(ends)), dtype=np.uint64)
        for back, is_exact in enumerate(exact):
            if is_exact:
                h += tok[:, ends - back] * _MULTIPLIERS[back]
        keys = np.array(
            [
                sum(int(t) * int(_MULTIPLIERS[b]) for b, t in enumerate(reversed(p.tokens)) if t != WILDCARD)
                % 2**64
                for _, p in group
            ],  # fmt: skip
            dtype=np.uint64,
        )
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        lo = np.searchsorted(sorted_keys, h, side="left")
        hi = np.searchsorted(sorted_keys, h, side="right")
        w_idx, e_idx = np.nonzero(hi > lo)
        if anchored and len(w_idx):
            ok = is_start[w_idx, ends[e_idx] - length]
            w_idx, e_idx = w_idx[ok], e_idx[ok]
        if not len(w_idx):
            continue
        # every (position, candidate pattern) pair with an equal hash, checked token by token
        counts = (hi - lo)[w_idx, e_idx]
        pair_w, pair_e = np.repeat(w_idx, counts), np.repeat(e_idx, counts)
        first = np.repeat(lo[w_idx, e_idx], counts)
        offset = np.arange(len(first)) - np.repeat(np.cumsum(counts) - counts, counts)
        cand = order[first + offset]
        pattern_tokens = np.array([p.tokens for _, p in group], dtype=np.int64)[cand]
        pair_end = ends[pair_e]
        seg = windows[pair_w[:, None], pair_end[:, None] - length + 1 + np.arange(length)]
        ok = ((pattern_tokens == WILDCARD) | (pattern_tokens == seg)).all(1)
        # one shape is one priority, and one trie holds a given pattern once: no duplicates to resolve here
        j = np.array([j for j, _ in group], dtype=np.int64)[cand][ok]
        value = np.array([p.value for _, p in group])[cand][ok]
        pw, pe = pair_w[ok], pair_end[ok]
        r = rank_of[group[0][1].priority()]
        wins = r > best[pw, pe, j]
        best[pw[wins], pe[wins], j[wins]] = r
        out[pw[wins], pe[wins], j[wins]] = value[wins]
    return out
