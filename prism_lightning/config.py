"""Typed settings shared by the stages (each a dataclass that YAML configs fill in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass

from prism_lightning import TINY_MODEL


@dataclass
class ModelArgs:
    """Which causal LM to load and how.

    ``name_or_path`` is a hub id or a local folder, loaded with ``AutoModelForCausalLM``.
    ``quantization: nf4`` loads the base in 4-bit (bitsandbytes, QLoRA).
    ``dtype`` is the base weights' dtype (``float32``, ``bfloat16``, ``float16``).
    """

    name_or_path: str = TINY_MODEL
    dtype: str = "float32"
    quantization: str | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str | None = "eager"
    trust_remote_code: bool = False


@dataclass
class LoraArgs:
    """LoRA adapter settings (METHOD.md: r=128, alpha=512, dropout 0.1 on q/k/v/o).

    ``enabled: false`` trains every parameter (full fine-tune).
    """

    enabled: bool = True
    r: int = 128
    alpha: int = 512
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    init_seed: int = 0


@dataclass
class OptimArgs:
    """AdamW with linear decay after a linear warmup of ``warmup_ratio`` of the steps."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03


def to_dict(obj) -> dict:
    """A dataclass as a JSON-ready dict."""
    return asdict(obj)


def plain(obj):
    """Dataclasses (nested in dicts/lists) as plain dicts, so checkpoints load with ``weights_only``."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj
