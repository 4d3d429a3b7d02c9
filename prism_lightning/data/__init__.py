from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.data.formats import load_pairs, load_sft

__all__ = ["PrismDataModule", "load_pairs", "load_sft"]
