"""bnkit: batch normalization for PyTorch, done right."""
from . import functional, reference, stats
from .freeze import batch_norm_layers, freeze_stats, frozen_stats, unfreeze_stats
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .stats import momentum
from .nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormBase, renorm_warmup

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "batch_norm_layers",
           "freeze_stats", "frozen_stats", "functional", "momentum", "reference", "stats", "unfreeze_stats"]
__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormBase", "renorm_warmup"]
