from prism_lightning.modules.features import GradientFeatureModule
from prism_lightning.modules.finetune import FinetuneModule
from prism_lightning.modules.sft import SFTModule
from prism_lightning.modules.warmup import WarmupModule

__all__ = ["FinetuneModule", "GradientFeatureModule", "SFTModule", "WarmupModule"]
