"""saebench: evaluate sparse autoencoders with the metrics of Gao et al. (2024)."""

__version__ = "0.1.0"
