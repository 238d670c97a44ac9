"""OpenAI sparse_autoencoder (the GPT-2 small releases): one `.pt` file per (location, layer).

The file is a dict: pre_bias (d), encoder.weight (n, d) without bias, latent_bias (n), decoder.weight
(d, n), statistics buffers, and `activation` ("TopK" | "ReLU") with `activation_state_dict` {k, postact_fn}.

    TopK:  u = (x - mean(x)) / (std(x) + 1e-5)   (unbiased std over d; the library normalises iff TopK)
           z = relu(topk_k((u - pre_bias) @ encoder.weight.T + latent_bias))
           x_hat = (z @ decoder.weight.T + pre_bias) * std(x) + mean(x)
    ReLU:  z = relu((x - pre_bias) @ encoder.weight.T + latent_bias);  x_hat = z @ decoder.weight.T + pre_bias

Nothing inside the file names the site: the release names it by folder and file,
`<location>[_v5_32k|_v5_128k|_v4]/autoencoders/<layer>.pt`.  resid_post_mlp of layer L is the residual
after block L; resid_post_attn (resid_mid), resid_delta_* (attention / MLP outputs) and mlp_post_act are
refused.  Without a recognised location the layer is left unknown.
"""

from __future__ import annotations

import re
from pathlib import Path

from saebench.sae.formats.common import (
    CheckpointError,
    CheckpointFormat,
    check_k,
    check_shapes,
    read_torch,
    require,
    torch_file_mentions,
    unhookable,
)
from saebench.sae.sae import SAE, Normalization, SAEInfo

TENSORS = ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight")
LOCATIONS = {
    "resid_post_mlp": None,
    "resid_post_attn": "the residual stream between attention and MLP (resid_mid)",
    "resid_delta_attn": "an attention output",
    "resid_delta_mlp": "an MLP output",
    "mlp_post_act": "MLP neuron activations",
}
_LOCATION = re.compile(r"^(" + "|".join(LOCATIONS) + r")(?:_v\w+)?$")
_LOCATION_LAYER = re.compile(r"^(" + "|".join(LOCATIONS) + r")_(\d+)$")


def detect(path: Path) -> bool:
    return (
        path.is_file()
        and path.suffix == ".pt"
        and path.name != "ae.pt"
        and torch_file_mentions(path, (b"pre_bias", b"latent_bias"))
    )


def load(path: Path) -> SAE:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; an OpenAI checkpoint is a single .pt file")
    state = read_torch(path)
    require(path, state, TENSORS, "an OpenAI autoencoder")
    shapes = {
        "pre_bias": ("d",),
        "encoder.weight": ("n", "d"),
        "latent_bias": ("n",),
        "decoder.weight": ("d", "n"),
    }
    sizes = check_shapes(path, state, shapes)
    activation = state.get("activation", "ReLU")
    act_state = state.get("activation_state_dict") or {}
    if activation == "TopK":
        if act_state.get("postact_fn", "ReLU") != "ReLU":
            raise CheckpointError(
                f"{path}: TopK with postact_fn {act_state.get('postact_fn')!r} is not supported (ReLU only)"
            )
        kwargs = dict(
            activation="topk",
            k=check_k(path, act_state.get("k"), sizes["n"]),
            normalization=Normalization("layer_norm", eps=1e-5, unbiased=True, undo_with_eps=False),
        )
    elif activation == "ReLU":
        kwargs = dict(activation="relu")
    else:
        raise CheckpointError(f"{path}: activation {activation!r} is not supported (TopK, ReLU)")

    location, layer = _site(path)
    info = SAEInfo(
        format="openai",
        architecture=activation,
        layer=layer,
        site_name=location,
        extra={"activation": activation, "activation_state_dict": act_state},
    )
    return SAE(
        state["encoder.weight"].T.contiguous(),
        state["latent_bias"],
        state["decoder.weight"].T.contiguous(),
        state["pre_bias"],
        b_pre=state["pre_bias"],
        info=info,
        **kwargs,
    )


def _site(path: Path) -> tuple[str | None, int | None]:
    """(location, layer) from `<location>[_vN]/.../<layer>.pt` or `<location>_<layer>.pt`; (None, None)
    when the path does not say."""
    stem = _LOCATION_LAYER.match(path.stem)
    if stem is not None:
        location, layer = stem.group(1), int(stem.group(2))
    else:
        parts = (_LOCATION.match(part) for part in reversed(path.parent.parts))
        match = next((m for m in parts if m is not None), None)
        if match is None:
            return None, None
        location, layer = match.group(1), int(path.stem) if path.stem.isdigit() else None
    if LOCATIONS[location] is not None:
        raise unhookable(path, f"{location} layer {layer}", LOCATIONS[location])
    return location, layer


FORMAT = CheckpointFormat(
    name="openai",
    needs="a .pt file holding pre_bias, encoder.weight, latent_bias and decoder.weight",
    detect=detect,
    load=load,
)
