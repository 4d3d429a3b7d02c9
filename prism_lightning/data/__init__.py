from prism_lightning.data.datamodule import PrismDataModule
from prism_lightning.data.formats import Columns, DataFormatError, load_pairs, load_sft

__all__ = ["PrismDataModule", "Columns", "DataFormatError", "load_pairs", "load_sft"]
