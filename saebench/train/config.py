"""The trainer's configuration: one dataclass, saved as JSON beside every checkpoint it produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .lr_trend import LrChoice, choose_lr

TRAIN_ACTIVATIONS = ("topk", "relu")
TRAIN_NORMALIZATIONS = ("none", "layer_norm", "token_norm")


@dataclass
class TrainConfig:
    """How to train one SAE (Gao et al. 2024's recipe unless a field says otherwise)."""

    activation: str = "topk"
    """'topk': z = relu(topk_k(pre)); 'relu': z = relu(pre) with an L1 penalty (the paper's baseline)."""

    n_latents: int = 16384
    """Number of latents n."""

    k: int = 32
    """Active latents per token for 'topk'; the target L0 of `l1_target_l0` presets refers to it too."""

    multi_topk: bool = False
    """Add Multi-TopK's term nmse(top-4k reconstruction) / 8 to the loss ('topk' only)."""

    auxk_alpha: float | None = None
    """Weight of the AuxK loss alpha * nmse(e_hat, e); None means 1/32 for 'topk' (0 for 'relu'); 0 is off."""

    k_aux: int | None = None
    """Dead latents used by AuxK per token; None means d_in // 2."""

    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens without activating (capped at 5% of max_tokens, see
    `effective_dead_tokens`)."""

    tied_init: bool = True
    """Initialise the encoder to the transpose of the decoder; False draws independent random directions."""

    encoder_init_scale: float | None = None
    """The initial encoder rows' norm; None means 1 for 'topk' (the paper's tied init) and 2 d_in / n_latents
    for 'relu', where about half the latents fire at init and unit rows would make the first
    reconstructions ~n / (2 d_in) times too large."""

    l1_coefficient: float = 0.1
    """'relu': lambda in nmse + lambda * sum_t ||z_t||_1 / (N * rms), rms = sqrt(sum_t ||u_t - mean||^2 / N);
    fixed during training (after the warm-up)."""

    l1_warmup: float = 0.05
    """'relu': lambda rises linearly from 0 over this fraction of max_tokens (none without max_tokens)."""

    l1_target_l0: float | None = None
    """'relu': the mean L0 the sweep runner aims for by searching lambda over fixed-lambda runs
    (`l1_search.py`); the trainer itself ignores it."""

    lr: float | None = None
    """Adam learning rate, constant; None means the fitted trend a * n_latents^b where one applies (same
    activation and batch size, budget within 2x; `lr_trend.py`), else 2e-4 / sqrt(n_latents / 2**14) (the
    paper's 1/sqrt(n) law); the checkpoint records the lr used and what chose it."""

    lr_at_n: int | None = None
    """With lr unset: train at the lr a run of this many latents would get (same trend or rule, same
    budget and batch), not n_latents' own; the fixed-lr sweep uses it to hold every n at n=2048's lr."""

    adam_beta1: float = 0.9
    """Adam's beta1."""

    adam_beta2: float = 0.999
    """Adam's beta2."""

    adam_eps: float = 6.25e-10
    """Adam's epsilon."""

    batch_size: int = 4096
    """Tokens per optimizer step (incoming batches are re-cut to this size)."""

    max_tokens: int | None = None
    """Stop at the first step boundary at or past this many tokens; None trains until the stream ends."""

    input_normalization: str = "layer_norm"
    """Per-token input map: 'layer_norm' u = (x - mean_d x) / (std_d x + 1e-5) with the unbiased std
    (OpenAI's TopK SAEs); 'token_norm' u = x sqrt(d) / ||x||; 'none'."""

    geometric_median_tokens: int = 16384
    """Tokens from the stream's start whose geometric median initialises b_pre (they are trained on too)."""

    seed: int = 0
    """Seed of the initialisation."""

    device: str = "cpu"
    """Torch device to train on ('cpu', 'cuda', 'cuda:1', 'mps', ...)."""

    latent_shards: int = 1
    """Latent-parallel training under torchrun: each of this many processes (the world size) holds
    n_latents / latent_shards latents (`distributed.py`); 1 with several processes is data parallel.  The
    trained weights are the same either way (to float rounding), so it is no part of what a run is."""

    dtype: str = "float32"
    """Parameter and compute dtype ('float32' or 'float64')."""

    sparse_backward: bool = True
    """'topk': back-propagate through the k selected latents only; False uses dense autograd (a reference)."""

    chunk_elements: int = 1 << 24
    """Largest (tokens x n_latents) block of dense pre-activations held at once; bounds memory."""

    log_every: int = 50
    """Steps between log lines (nmse, L0, dead fraction)."""

    checkpoint_every: int = 1000
    """Steps between checkpoints; 0 saves only at the end."""

    def __post_init__(self):
        if self.activation not in TRAIN_ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {TRAIN_ACTIVATIONS}")
        if self.input_normalization not in TRAIN_NORMALIZATIONS:
            raise ValueError(
                f"unknown input normalisation {self.input_normalization!r}; "
                f"expected one of {TRAIN_NORMALIZATIONS}"
            )
        if not 0 < self.k <= self.n_latents:
            raise ValueError(f"need 0 < k <= n_latents, got k={self.k}, n_latents={self.n_latents}")
        if self.multi_topk and 4 * self.k > self.n_latents:
            raise ValueError(f"Multi-TopK needs 4k <= n_latents, got k={self.k}, n_latents={self.n_latents}")
        if self.activation == "relu" and (self.auxk_alpha or self.multi_topk):
            raise ValueError(
                "AuxK and Multi-TopK apply to TopK SAEs: leave auxk_alpha and multi_topk unset for relu"
            )
        if not 0 <= self.l1_warmup < 1:
            raise ValueError(f"l1_warmup is a fraction of the run in [0, 1), got {self.l1_warmup}")
        if self.encoder_init_scale is not None and not self.encoder_init_scale > 0:
            raise ValueError(f"encoder_init_scale must be positive, got {self.encoder_init_scale}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"Adam's betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if not self.adam_eps >= 0:
            raise ValueError(f"adam_eps must be >= 0, got {self.adam_eps}")
        if self.auxk_alpha is not None and not self.auxk_alpha >= 0:
            raise ValueError(f"auxk_alpha must be >= 0 (0 turns AuxK off), got {self.auxk_alpha}")
        if not self.l1_coefficient >= 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if self.l1_target_l0 is not None and not self.l1_target_l0 > 0:
            raise ValueError(f"l1_target_l0 must be positive, got {self.l1_target_l0}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.k_aux is not None and self.k_aux < 1:
            raise ValueError(f"k_aux must be positive (auxk_alpha=0 turns AuxK off), got {self.k_aux}")
        if self.lr_at_n is not None and self.lr_at_n < 1:
            raise ValueError(f"lr_at_n must be a positive number of latents, got {self.lr_at_n}")
        for name in ("n_latents", "batch_size", "dead_tokens", "geometric_median_tokens", "chunk_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.latent_shards < 1 or self.n_latents % self.latent_shards:
            raise ValueError(
                f"latent_shards must be a positive divisor of n_latents={self.n_latents}, "
                f"got {self.latent_shards}"
            )
        if self.latent_shards > 1 and self.activation != "topk":
            raise ValueError("latent_shards applies to TopK SAEs; train the ReLU baseline data-parallel")
        if self.log_every < 1:
            raise ValueError(f"log_every must be positive, got {self.log_every}")

    def lr_choice(self) -> LrChoice:
        """The lr this config trains at and what chose it ("set", "trend ...", "paper rule ...")."""
        return choose_lr(self)

    def effective_lr(self) -> float:
        return self.lr_choice().lr

    def effective_auxk_alpha(self) -> float:
        if self.auxk_alpha is not None:
            return self.auxk_alpha
        return 1 / 32 if self.activation == "topk" else 0.0

    def effective_encoder_init_scale(self, d_in: int) -> float:
        if self.encoder_init_scale is not None:
            return self.encoder_init_scale
        return 1.0 if self.activation == "topk" else min(1.0, 2 * d_in / self.n_latents)

    def effective_k_aux(self, d_in: int) -> int:
        return self.k_aux if self.k_aux is not None else d_in // 2

    def effective_dead_tokens(self) -> int:
        """dead_tokens, capped for short runs at 5% of max_tokens (10M tokens is ~1% of the paper's runs),
        and never below one batch."""
        if self.max_tokens is None:
            return self.dead_tokens
        return max(self.batch_size, min(self.dead_tokens, self.max_tokens // 20))

    def to_dict(self) -> dict:
        return asdict(self)
