"""The modules users hold."""
from .batchnorm import STATS_FROZEN_MODES, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "STATS_FROZEN_MODES",
           "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]
