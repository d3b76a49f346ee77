"""``LoRASpec``: the one home of the LoRA options (paper section 3, appendices F and N).

Every LoRA-based method (LoRA-Ensemble, Snapshot Ensemble, Bayes-LoRA) takes one ``lora``
argument of this type, :func:`~lorae.lora.inject.inject_lora` and the layer classes read it,
so an option is declared, defaulted and validated once. In a config (PEFT's ``LoraConfig``
plays the same role)::

    model:
      method:
        class_path: lorae.methods.LoRAEnsemble
        init_args:
          lora: {rank: 8, targets: [q, k, v, o], gain: 10.0}

and on the command line ``--model.method.init_args.lora.rank=4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from lorae.errors import ConfigError
from lorae.lora.targets import ATTENTION, Projection

#: Initialisation of the ``A`` factors: Xavier-uniform or Gaussian (paper appendix N), or
#: PEFT's default ``kaiming_uniform`` (``LoraConfig(init_lora_weights=True)``: Kaiming-uniform
#: with ``a = sqrt(5)``, bound ``1 / sqrt(D_in)``), the "standard LoRA setup" of the Bayes-LoRA
#: baseline (appendix W), which the paper ran with Yang et al.'s PEFT-based implementation.
LoRAInit = Literal["xavier_uniform", "normal", "kaiming_uniform"]


@dataclass(frozen=True)
class LoRASpec:
    """Where LoRA goes and how its factors start (paper section 3, Eq. 3; appendices F, N).

    Attributes:
        rank: LoRA rank R (paper: 8 for ViT, 64 for BERT).
        alpha: scale numerator: deltas are multiplied by ``alpha / rank``; ``None`` means
            ``alpha = rank`` (scale 1, as the paper).
        targets: projections that get LoRA: any of ``q``, ``k``, ``v``, ``o`` (attention, the
            paper's default) and ``mlp`` (both feed-forward linears, the "+ MLP" variant).
        last_blocks: adapt only the last k transformer blocks (``None``: all blocks; ``0``:
            none, LoRA-Ensemble's head-only ensemble).
        init: ``A`` initialisation, ``"xavier_uniform"`` (with ``gain``), ``"normal"``
            (with ``std``) or ``"kaiming_uniform"`` (PEFT's default, neither); ``B`` always
            starts at zero.
        gain: Xavier-uniform gain (paper default 10, so that members start diverse).
        std: standard deviation of the Gaussian init.

    Raises:
        ConfigError: a value outside what the attribute allows (the message says what is).
    """

    rank: int = 8
    alpha: float | None = None
    targets: tuple[Projection, ...] = ATTENTION
    last_blocks: int | None = None
    init: LoRAInit = "xavier_uniform"
    gain: float = 10.0
    std: float = 0.02

    def __post_init__(self) -> None:
        # A list from Python code becomes a tuple: the spec stays hashable and immutable.
        object.__setattr__(self, "targets", tuple(self.targets))
        if not _is_int(self.rank) or self.rank < 1:
            raise ConfigError(f"lora.rank must be an integer >= 1, got {self.rank!r}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(
                f"lora.alpha must be > 0, or null for alpha = rank (scale 1), got {self.alpha!r}."
            )
        allowed = get_args(Projection)
        bad = [t for t in self.targets if t not in allowed]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(
                f"lora.targets must be a non-empty list of distinct projections from "
                f"{list(allowed)}, got {list(self.targets)}."
            )
        if self.last_blocks is not None and (not _is_int(self.last_blocks) or self.last_blocks < 0):
            raise ConfigError(
                "lora.last_blocks must be null (all blocks), 0 (no adapters: the head-only "
                f"ensemble) or an integer k >= 1 (the last k blocks), got {self.last_blocks!r}."
            )
        if self.init not in get_args(LoRAInit):
            raise ConfigError(
                f"lora.init must be one of {list(get_args(LoRAInit))}, got {self.init!r}."
            )
        if not self.gain > 0 or not self.std > 0:
            raise ConfigError(
                f"lora.gain and lora.std must be > 0, got gain={self.gain!r}, std={self.std!r}."
            )

    @property
    def scale(self) -> float:
        """The LoRA scale ``alpha / rank`` (1 with the default ``alpha = rank``)."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
