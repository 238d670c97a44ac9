"""Sparse autoencoders: the internal SAE and the checkpoint formats that load into it."""

from saebench.sae.sae import SAE, Encoded, InputState, Normalization, Reconstruction, SAEInfo, SparseCodes

__all__ = ["SAE", "Encoded", "InputState", "Normalization", "Reconstruction", "SAEInfo", "SparseCodes"]
