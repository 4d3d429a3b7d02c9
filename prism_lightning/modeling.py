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


def _model_file(source: str, name: str) -> Path | None:
    """A file of a model folder or of a hub model's local cache (None when it has no such file)."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.exists() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, name)
    return Path(found) if isinstance(found, str) else None


FULL_HASH_BYTES = 1 << 30  # weights up to this size are hashed whole


def model_digest(model: ModelArgs) -> str:
    """sha256 of what identifies a base model: ``config.json`` and its weights, hashed whole up to 1 GiB; larger
    models by their index (``model.safetensors.index.json``, else each ``*.safetensors`` file's header: names,
    dtypes, shapes, offsets), so that two large models of one architecture whose weights differ only in value
    are told apart by ``name_or_path``, not by this digest."""
    import hashlib

    source = model_source(model.name_or_path)
    h = hashlib.sha256()
    config = _model_file(source, "config.json")
    if config is None:
        raise FileNotFoundError(f"model.name_or_path={model.name_or_path!r}: no config.json there (or in the hub "
                                "cache); give a local model folder or a cached hub id")
    h.update(config.read_bytes())
    index = _model_file(source, "model.safetensors.index.json")
    files = [index] if index is not None else [f for f in [_model_file(source, "model.safetensors")] if f]
    for f in files:
        with open(f, "rb") as fh:
            if f.suffix == ".json" or f.stat().st_size <= FULL_HASH_BYTES:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(int.from_bytes(fh.read(8), "little")))
        h.update(f.name.encode())
    return h.hexdigest()


def base_model_identity(model: ModelArgs, precision: str | None = None) -> dict:
    """What decides a base model's numbers: which model (path and ``model_digest``), its quantization, dtype and
    attention implementation, and the trainer's precision."""
    return {"name_or_path": model.name_or_path, "sha256": model_digest(model), "quantization": model.quantization,
            "dtype": model.dtype, "attn_implementation": model.attn_implementation, "precision": precision}


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
