"""``FinetuneModule``: the final fine-tune on the selected (forward) or kept (repair) pool rows."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from prism_lightning.callbacks.adapter_checkpoint import save_trainable
from prism_lightning.io import atomic_folder
from prism_lightning.modeling import merge_adapter
from prism_lightning.modules.sft import SFTModule
from prism_lightning.sharding import gather_trainable


class FinetuneModule(SFTModule):
    """LoRA / QLoRA / full fine-tune on ``data.train_on: selection``; evaluates by greedy exact match.

    Saves the final adapter (peft ``save_pretrained``; a full fine-tune saves the whole model) to
    ``<output_dir>/<run_name>/adapter/`` and, with ``save_merged``, LoRA merged into the base under
    ``<output_dir>/<run_name>/merged/`` (Hugging Face format, loadable with ``from_pretrained``;
    merged on rank 0's CPU into the unquantized base, also after a QLoRA or FSDP run).

    Args:
        run_name: sub-folder of ``output_dir`` for the adapter, merged model and metrics.
        save_merged: also save the base with the adapter merged in.
        generate_eval: greedy generation on held-out rows and pairs (on by default here).
    """

    def __init__(self, *args, run_name: str = "finetune", save_merged: bool = False,
                 generate_eval: bool = True, **kwargs):
        super().__init__(*args, generate_eval=generate_eval, **kwargs)
        self.run_name, self.save_merged = run_name, save_merged
        self.stage_dir = run_name

    def configure_callbacks(self):
        """Lightning checkpoints (for ``--ckpt_path last``) go under ``<output_dir>/<run_name>/lightning/``,
        when the trainer checkpoints at all (the pipeline's fine-tunes do not)."""
        if not self.trainer.checkpoint_callbacks:
            return []
        return [ModelCheckpoint(dirpath=str(Path(self.output_dir) / self.run_name / "lightning"),
                                filename="{epoch}", save_last=True, save_top_k=-1, every_n_epochs=1)]

    def on_train_end(self) -> None:
        weights = gather_trainable(self.model)  # collective under FSDP: every rank takes part
        if not self.trainer.is_global_zero:
            return
        folder = Path(self.output_dir) / self.run_name
        with atomic_folder(folder / "adapter") as tmp:
            save_trainable(self.model, weights, tmp)
        if self.save_merged and self.lora_args.enabled:
            with atomic_folder(folder / "merged") as tmp:
                merge_adapter(self.model_args, folder / "adapter", tmp)
                self.trainer.datamodule.tokenizer.save_pretrained(str(tmp))
