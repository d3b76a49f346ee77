"""What the speed harness runs: settings, model builders, inference and training steps.

Every model is built with ``pretrained=False`` (random weights: no downloads, and timings do
not depend on the values) from the same backbone name and overrides, so LoRA-Ensemble, the
vmap reference, the Explicit Ensemble and the plain backbone are the same network.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from benchmarks.vmap_reference import use_vmap_reference
from lorae.backbones import Backbone, create_backbone
from lorae.lora import LoRASpec
from lorae.methods import EnsembleMethod, ExplicitEnsemble, LoRAEnsemble
from lorae.metrics import member_cross_entropy

Dtype = Literal["float32", "bf16"]
Device = Literal["cpu", "cuda"]

#: Inference cases: name -> what it is (the Markdown table's row label).
INFERENCE_CASES: dict[str, str] = {
    "plain": "plain backbone (batch B and batch M·B)",
    "lorae": "LoRA-Ensemble as built (default options)",
    "lorae_one_batch": "LoRA-Ensemble, member_chunk_size=None (one batch of M·B)",
    "lorae_auto": 'LoRA-Ensemble, member_chunk_size="auto"',
    "lorae_compiled": "LoRA-Ensemble, compile=True",
    "vmap": "vmap-over-members reference layer (the paper's approach)",
    "explicit_loop": "Explicit Ensemble, members in a loop",
    "explicit_vmap": "Explicit Ensemble, vmap over members",
}
#: Training-step cases (forward, member cross-entropy, backward, AdamW step).
TRAIN_CASES: dict[str, str] = {
    "train_lorae": "LoRA-Ensemble as built",
    "train_lorae_compiled": "LoRA-Ensemble, compile=True",
    "train_vmap": "vmap-over-members reference layer",
    "train_explicit_loop": "Explicit Ensemble, members in a loop",
    "train_explicit_vmap": "Explicit Ensemble, vmap over members",
    "train_peft": "one LoRA adapter at a time (PEFT-style): M steps at batch B",
    "plain_train": "training floor: frozen backbone, input requiring grad, forward + backward "
    "at M·B rows and as M batches of B",
}
#: The cases of the training-floor table, run at every training size (see
#: ``Settings.extra_train_sizes``; the other training cases only at the first size).
FLOOR_CASES = (
    "plain_train",
    "train_lorae",
    "train_explicit_loop",
    "train_explicit_vmap",
    "train_peft",
)
ALL_CASES = (*INFERENCE_CASES, *TRAIN_CASES)
#: Run unless ``--cases`` says otherwise (compiling ViT-B takes minutes on a CPU).
DEFAULT_CASES = tuple(c for c in ALL_CASES if "compiled" not in c)


@dataclass(frozen=True)
class Settings:
    """One harness run's sizes and environment (all of it lands in the JSON).

    Attributes:
        backbone: registered backbone name (timm or torchvision ViT).
        backbone_overrides: architecture overrides (e.g. a tiny model for tests).
        num_classes: C of the heads (100: the paper's CIFAR-100 setting).
        members: M of the inference cases and of the parameter and fit checks.
        batches: the B values of the inference cases.
        rank: LoRA rank R.
        train_members, train_batch: M and B of the training-step cases (and of the memory
            measurement of a training step).
        extra_train_sizes: further ``(M, B)`` at which the training-floor cases
            (:data:`FLOOR_CASES`) run, e.g. ``((16, 32),)``.
        fit_batch: B of the "M-member training fits in memory" check.
        dtype: ``float32`` or ``bf16`` (bf16-mixed autocast, as Lightning's ``bf16-mixed``).
        device: ``cpu`` or ``cuda``.
        threads: ``torch.set_num_threads`` (CPU).
        repeats: timed runs per case; ``slow_repeats`` for cases whose warm-up took more than
            ``slow_seconds``, ``fast_repeats`` for those under ``fast_seconds`` (sub-second
            calls are noisy, and more of them cost little).
        warmup: untimed runs per case before timing.
        cases: which cases run (see :data:`ALL_CASES`).
        memory: measure peak memory (fresh subprocesses) and the fit check.
        seed: seed of every model and input.
    """

    backbone: str = "vit_base_patch32_224"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 100
    members: int = 16
    batches: tuple[int, ...] = (1, 32)
    rank: int = 8
    train_members: int = 4
    train_batch: int = 8
    extra_train_sizes: tuple[tuple[int, int], ...] = ()
    fit_batch: int = 32
    dtype: Dtype = "float32"
    device: Device = "cpu"
    threads: int = 2
    repeats: int = 3
    slow_repeats: int = 2
    slow_seconds: float = 5.0
    fast_repeats: int = 15
    fast_seconds: float = 2.0
    warmup: int = 1
    cases: tuple[str, ...] = DEFAULT_CASES
    memory: bool = True
    seed: int = 0


def train_sizes(s: Settings) -> list[tuple[int, int]]:
    """Every ``(M, B)`` of the training cases: ``(train_members, train_batch)`` first."""
    sizes = [(s.train_members, s.train_batch)]
    return sizes + [(m, b) for m, b in s.extra_train_sizes if (m, b) not in sizes]


def lorae_options() -> dict[str, Any]:
    """The optional LoRAEnsemble arguments this version has, with their defaults.

    ``member_chunk_size`` and ``compile`` arrived with issue 6; older builds lack them, and
    the harness then skips the variants that need them.
    """
    params = inspect.signature(LoRAEnsemble.__init__).parameters
    return {n: params[n].default for n in ("member_chunk_size", "compile") if n in params}


def skipped_variants(cases: tuple[str, ...]) -> dict[str, str]:
    """Cases that cannot run (or would duplicate another) in this build, with the reason."""
    options = lorae_options()
    reasons: dict[str, str] = {}
    for case in cases:
        if case in ("lorae_one_batch", "lorae_auto"):
            value = None if case == "lorae_one_batch" else "auto"
            if "member_chunk_size" not in options:
                reasons[case] = "LoRAEnsemble has no member_chunk_size option in this build"
            elif options["member_chunk_size"] == value:
                reasons[case] = f"the default member_chunk_size is {value!r}: same as 'lorae'"
        if "compiled" in case and "compile" not in options:
            reasons[case] = "LoRAEnsemble has no compile option in this build"
    return reasons


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


def build_plain(s: Settings) -> Backbone:
    """The backbone alone (the floor's reference). Shape: ``(B, C_in, H, W) -> (B, D)``."""
    seeded(s.seed)
    return create_backbone(s.backbone, False, s.backbone_overrides)


def build_lorae(
    s: Settings, members: int, chunk: object = "default", compiled: bool = False
) -> LoRAEnsemble:
    """LoRA-Ensemble with ``members`` members; ``chunk`` is a ``member_chunk_size`` value or
    ``"default"`` (the class's own default)."""
    # Options from issue 6 are passed only when asked for, so older builds still construct.
    extra: dict[str, Any] = {}
    if chunk != "default":
        extra["member_chunk_size"] = chunk
    if compiled:
        extra["compile"] = True
    seeded(s.seed)
    method = LoRAEnsemble(
        s.num_classes,
        s.backbone,
        num_members=members,
        lora=LoRASpec(rank=s.rank),
        pretrained=False,
        backbone_overrides=s.backbone_overrides,
        **extra,
    )
    # Trained-looking adapters (B = 0 at init): the harness's vmap-versus-lorae output check
    # then covers the low-rank deltas too. Same seed, same values in every variant.
    generator = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        for name, param in method.named_parameters():
            if name.endswith(".B") and not param.is_meta:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return method


def build_vmap_reference(s: Settings, members: int) -> LoRAEnsemble:
    """The same LoRA-Ensemble (same seed, one batch of M·B) with its LoRA layers evaluated
    by :class:`~benchmarks.vmap_reference.VmapLoRALinear`."""
    chunk = None if "member_chunk_size" in lorae_options() else "default"
    method = build_lorae(s, members, chunk=chunk)
    use_vmap_reference(method)
    return method


def build_explicit(s: Settings, members: int) -> ExplicitEnsemble:
    """Explicit Ensemble of ``members`` full copies; ``.vectorize`` picks loop or vmap."""
    seeded(s.seed)
    return ExplicitEnsemble(
        s.num_classes,
        s.backbone,
        num_members=members,
        vectorize="loop",
        pretrained=False,
        backbone_overrides=s.backbone_overrides,
    )


def input_shape(backbone: Backbone) -> tuple[int, int, int]:
    """``(C_in, H, W)`` the backbone takes (timm or torchvision ViT)."""
    model = backbone.model
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:  # timm
        height, width = patch_embed.img_size
        return int(patch_embed.proj.in_channels), int(height), int(width)
    size = getattr(model, "image_size", None)
    if isinstance(size, int):  # torchvision
        return 3, size, size
    raise SystemExit(
        f"speed.py: backbone {backbone.family!r} is not an image ViT; the harness times timm "
        "and torchvision ViTs (e.g. vit_base_patch32_224, vit_b_32)."
    )


def make_inputs(
    shape: tuple[int, int, int], batch: int, num_classes: int, seed: int, device: str
) -> tuple[Tensor, Tensor]:
    """A random image batch ``(B, C_in, H, W)`` and targets ``(B,)`` on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    return x.to(device), y.to(device)


def autocast(s: Settings) -> contextlib.AbstractContextManager[Any]:
    """bf16-mixed (parameters float32, matmuls bf16, as Lightning's ``bf16-mixed``) or none."""
    if s.dtype == "bf16":
        return torch.autocast(s.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def infer(s: Settings, model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """One inference call: eval mode, no autograd, the dtype's autocast."""

    def run() -> Tensor:
        model.eval()
        with torch.no_grad(), autocast(s):
            return model(x)

    return run


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(
    s: Settings, method: EnsembleMethod, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> Callable[[], Tensor]:
    """One full training step: forward, the mean over members of each member's cross-entropy
    (the loss of :class:`~lorae.module.EnsembleClassifier`), backward, AdamW step."""

    def run() -> Tensor:
        method.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(s):
            loss = member_cross_entropy(method(x).float(), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return run


def plain_train_step(
    s: Settings, backbone: Backbone, x: Tensor, members: int = 1
) -> Callable[[], Tensor]:
    """The training floor: the frozen backbone's forward and backward with gradients to the
    input only (none to the weights), as every M-member LoRA-Ensemble step must at least run
    them. ``members`` > 1 runs ``x`` that many times in sequence (M batches of B); else ``x``
    is the whole batch (one batch of M·B rows).

    Shape:
        x: ``(B, C_in, H, W)``.
    """
    backbone.requires_grad_(False)
    x = x.detach().clone().requires_grad_(True)

    def run() -> Tensor:
        backbone.train()
        x.grad = None
        total = torch.zeros((), device=x.device)
        for _ in range(members):
            with autocast(s):
                loss = backbone(x).float().square().mean()
            loss.backward()
            total += loss.detach()
        return total

    return run


def peft_steps(
    s: Settings, method: EnsembleMethod, members: int, x: Tensor, y: Tensor
) -> Callable[[], Tensor]:
    """PEFT's way to an M-member ensemble: one LoRA adapter trained at a time, so M full
    training steps at batch B of a one-adapter model (``method``: a 1-member
    LoRA-Ensemble, whose layers compute PEFT's LoRA ``W_0 x + s·B A x`` on the same targets).
    """
    step = train_step(s, method, adamw(method), x, y)

    def run() -> Tensor:
        losses = [step() for _ in range(members)]
        return torch.stack(losses).mean()

    return run


def explicit_too_big(s: Settings, members: int, available_bytes: int) -> str | None:
    """Why an M-member Explicit Ensemble training step is not run here (``None``: it is):
    M x (weights, gradients and AdamW's two moments, float32) of the backbone alone exceed
    80% of the memory available, before any activation (the harness must not push a shared
    machine into the OOM killer)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_plain(s).parameters())
    need = members * 4 * parameters * 4
    if need <= 0.8 * available_bytes:
        return None
    return (
        f"M = {members} full copies need {need / 1024**3:.1f} GiB for weights, gradients and "
        f"AdamW moments alone; {available_bytes / 1024**3:.1f} GiB were available"
    )


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (as the CLI's optimizer injection)."""
    return torch.optim.AdamW(trainable(model), lr=1e-4)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
