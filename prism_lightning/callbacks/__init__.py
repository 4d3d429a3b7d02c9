from prism_lightning.callbacks.adapter_checkpoint import ReferenceCheckpoint
from prism_lightning.callbacks.reselection import PrismReselection

__all__ = ["PrismReselection", "ReferenceCheckpoint"]
