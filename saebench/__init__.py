"""saebench: evaluate sparse autoencoders with the metrics of Gao et al. (2024)."""

__version__ = "0.1.0"


def load_sae(path, format=None, device="cpu", dtype=None):
    """Load an SAE checkpoint in any supported format (see `saebench.sae.load.load_sae`)."""
    import torch

    from saebench.sae.load import load_sae as _load

    return _load(path, format=format, device=device, dtype=dtype or torch.float32)
