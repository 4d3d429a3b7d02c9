from prism_lightning.modules.curvature import CurvatureModule
from prism_lightning.modules.features import GradientFeatureModule
from prism_lightning.modules.finetune import FinetuneModule
from prism_lightning.modules.sft import SFTModule
from prism_lightning.modules.warmup import WarmupModule

__all__ = ["CurvatureModule", "FinetuneModule", "GradientFeatureModule", "SFTModule", "WarmupModule"]
