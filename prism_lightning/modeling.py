"""Loading a causal LM, its tokenizer and a LoRA/QLoRA adapter the way a hub model is loaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from prism_lightning.config import LoraArgs, ModelArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, with a clear error for unknown names."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} (model.dtype, fsdp.param_dtype/reduce_dtype or store_dtype) is not one "
                         f"of {sorted(DTYPES)}")
    return DTYPES[name]


def model_source(name: str) -> str:
    """``name`` checked: a local path (absolute, ``./``, ``../``, ``~`` or several ``/``) must exist.

    A hub id (``org/name``) is passed on as is; without network access it must be in the local cache.
    """
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    path = Path(name).expanduser()
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model.name_or_path={name!r}: no such folder; give a local folder holding the "
                                "model's config.json and weights, or a hub id such as meta-llama/Llama-3.1-8B")
    return str(path) if looks_local else name


def load_tokenizer(model: ModelArgs):
    """``AutoTokenizer`` for the model, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_source(model.name_or_path), trust_remote_code=model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_base_model(model: ModelArgs, empty: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in ``model.dtype``; 4-bit NF4 when quantized.

    ``empty``: the same architecture built from its config on the ``meta`` device (no weights read, no memory),
    for ranks that receive their shards from rank 0 (``sharding.shard_from_rank0``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {"dtype": torch_dtype(model.dtype), "trust_remote_code": model.trust_remote_code}
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if empty:
        if model.quantization:
            raise ValueError("a quantized (QLoRA) base cannot be built empty: every rank loads it")
        config = AutoConfig.from_pretrained(model_source(model.name_or_path), trust_remote_code=model.trust_remote_code)
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config, **kwargs)
        base.tie_weights()  # from_pretrained ties embeddings and lm_head; from_config on meta may not (5.0)
        return base
    if model.quantization:
        if model.quantization != "nf4":
            raise ValueError(f"model.quantization={model.quantization!r}: only 'nf4' (QLoRA) is supported")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(model.dtype),
            bnb_4bit_quant_storage=torch_dtype(model.dtype))
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(model_source(model.name_or_path), **kwargs)


def build_model(model: ModelArgs, lora: LoraArgs, adapter_path: str | Path | None = None,
                trainable: bool = True, empty: bool = False) -> nn.Module:
    """Base model plus a fresh LoRA (seeded init) or the adapter saved at ``adapter_path``.

    With ``lora.enabled=False`` every parameter trains (full fine-tune) and no adapter is added.
    ``empty``: the same modules (and trainable flags) on the ``meta`` device, without reading any weight.
    """
    base = load_base_model(model, empty=empty)
    if model.quantization:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if not lora.enabled:
        if adapter_path is not None:
            raise ValueError("lora.enabled=false cannot load a LoRA adapter; point model.name_or_path "
                             "at the full checkpoint instead")
        return base
    from peft import LoraConfig, PeftModel, get_peft_model

    if empty:  # the adapter's structure only: its values come from rank 0
        config = LoraConfig.from_pretrained(str(adapter_path)) if adapter_path is not None else None
        config = config or LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
        config.inference_mode = not trainable
        with torch.device("meta"):
            return get_peft_model(base, config)
    if adapter_path is not None:
        return PeftModel.from_pretrained(base, str(adapter_path), is_trainable=trainable)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.init_seed)
        peft_model = get_peft_model(base, config)
    return peft_model


def load_adapter_weights(model: nn.Module, folder: str | Path, device: torch.device | str) -> None:
    """Put the LoRA weights of a checkpoint folder's ``adapter_model.safetensors`` into a peft ``model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors"), device=str(device)))


def merge_adapter(model: ModelArgs, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Base (unquantized, ``model.dtype``, CPU) + LoRA adapter merged: ``W + (alpha / r) B A``, saved to ``out_dir``."""
    from peft import PeftModel

    base = load_base_model(replace(model, quantization=None))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    return Path(out_dir)


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name (the LoRA A/B matrices for a LoRA model)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
