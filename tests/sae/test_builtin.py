import pytest
import torch

from saebench.sae.builtin import build_builtin, parse_builtin


def test_builtin_baselines_default_to_the_trainers_layer_norm_space():
    spec = parse_builtin("builtin:pca-topk:k=8")
    assert spec.space == "layer_norm" and spec.label == "builtin-pca-topk-k8"
    raw = parse_builtin("builtin:random-topk:space=raw,n=64")
    assert raw.space == "raw" and raw.label == "builtin-random-topk-raw-n64-k32"
    with pytest.raises(ValueError, match="bad option 'space=cube'"):
        parse_builtin("builtin:pca-topk:space=cube")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g) * torch.linspace(0.1, 30, 16) + 5.0
    sae = build_builtin(parse_builtin("builtin:pca-topk:k=16"), x)
    assert sae.normalization.kind == "layer_norm" and sae.info.extra["space"] == "layer_norm"
    assert torch.allclose(sae(x), x, atol=1e-3, rtol=1e-4)  # k = d: the whole basis reconstructs exactly
    assert build_builtin(raw, x).normalization.kind == "none"


@pytest.mark.parametrize("d", [1, 7, 12, 64])
def test_random_directions_in_blocks_are_the_one_call_draw(d):
    """A wide random dictionary is drawn in blocks of rows (never whole in float64), to the same values as
    one float64 draw of all rows normalised and cast (how builtin:random-topk was built)."""
    from saebench.sae.builtin import random_directions

    g = torch.Generator().manual_seed(3)
    whole = torch.randn(101, d, generator=g, dtype=torch.float64)
    want = (whole / whole.norm(dim=1, keepdim=True)).float()
    for rows in (16, 32, 48, 96, 1 << 14):
        assert torch.equal(random_directions(101, d, 3, block_rows=rows), want), rows
    with pytest.raises(ValueError, match="multiple of 16"):
        random_directions(101, d, 3, block_rows=10)
