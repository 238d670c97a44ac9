import types

import pytest
import torch

from saebench.model.scoring import (
    ce_and_kl,
    ce_and_kl_linear,
    clean_reference,
    has_linear_head,
    next_token_ce,
)


def fake_model(vocab=300, d=16, bias=True, softcap=None):
    torch.manual_seed(0)
    head = torch.nn.Linear(d, vocab, bias=bias)

    def logits(h):
        out = head(h) * 3
        return out if softcap is None else torch.tanh(out / softcap) * softcap

    # scale the head so the distributions are peaked, as an LM's are
    with torch.no_grad():
        head.weight.mul_(3)
        if bias:
            head.bias.mul_(3)
    family = types.SimpleNamespace(
        head=types.SimpleNamespace(weight=head.weight * 3, bias=head.bias * 3 if bias else None),
        softcap=softcap,
    )
    return types.SimpleNamespace(logits=logits, family=family)


def direct(model, hq, hp, t):
    lq, lp = (
        torch.log_softmax(model.logits(hq).double(), -1),
        torch.log_softmax(model.logits(hp).double(), -1),
    )
    ce = -lq.gather(-1, t[..., None])[..., 0]
    return ce, (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_head_kl_equals_log_softmax_kl(bias):
    model = fake_model(bias=bias)
    hp = torch.randn(3, 70, 16)
    hq = hp + 0.3 * torch.randn_like(hp)
    t = torch.randint(0, 300, (3, 70))
    ce_ref, kl_ref = direct(model, hq, hp, t)
    ce_clean, e, c = clean_reference(model, hp, t, chunk=32)
    assert torch.allclose(ce_clean, direct(model, hp, hp, t)[0], atol=1e-5)
    ce, kl = ce_and_kl_linear(model, hq, t, e, c, chunk=32)
    assert torch.allclose(ce, ce_ref, atol=1e-5) and torch.allclose(kl, kl_ref, atol=1e-5)
    assert kl_ref.mean() > 0.05  # a real difference, not a trivially zero KL
    ce2, kl2 = ce_and_kl(model, hq, hp, t, chunk=32)
    assert torch.allclose(ce2, ce_ref, atol=1e-5) and torch.allclose(kl2, kl_ref, atol=1e-5)
    assert torch.allclose(next_token_ce(model, hq, t, chunk=50), ce_ref.float(), atol=1e-5)


def test_softcapped_head_uses_the_general_path():
    model = fake_model(softcap=5.0)
    assert not has_linear_head(model)
    hp = torch.randn(2, 40, 16)
    hq = hp + 0.3 * torch.randn_like(hp)
    t = torch.randint(0, 300, (2, 40))
    ce_ref, kl_ref = direct(model, hq, hp, t)
    ce, kl = ce_and_kl(model, hq, hp, t, chunk=16)
    assert torch.allclose(ce, ce_ref, atol=1e-5) and torch.allclose(kl, kl_ref, atol=1e-5)
