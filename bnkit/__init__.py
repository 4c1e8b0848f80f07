"""bnkit: batch normalization for PyTorch, done right."""
from . import functional, reference, stats
from .tools.accumulate import accumulate
from .tools.calibrate import CalibrationReport, calibrate
from .tools.freezing import (batch_norm_layers, freeze_stats, frozen_stats, set_stats_frozen_mode, stats_frozen_mode,
                            unfreeze_stats)
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase, nonfinite_report
from .nn import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .tools.keras import from_keras, to_keras
from .ops.backend import get_backend, set_backend
from .stats import momentum

import sys as _sys

_sys.modules[__name__ + ".momentum"] = momentum  # `from bnkit.momentum import Decay` works too
from .tools.doctor import doctor
from .tools.fold import fold
from .nn import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormBase, renorm_warmup
from .nn import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, SyncBatchNorm
from .nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostBatchNormBase
from .nn import DomainBatchNorm, DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d, use_domain
from .tools.conversion import convert, convert_sync_batchnorm, freeze

__version__ = "0.1.0"

__all__ = ["accumulate", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "batch_norm_layers",
           "calibrate", "CalibrationReport",
           "freeze_stats", "frozen_stats", "functional", "momentum", "reference", "stats", "unfreeze_stats"]
__all__ += ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "from_keras", "to_keras"]
__all__ += ["doctor", "fold"]
__all__ += ["get_backend", "set_backend", "nonfinite_report", "set_stats_frozen_mode", "stats_frozen_mode"]
__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormBase", "renorm_warmup"]
__all__ += ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "SyncBatchNorm",
            "convert", "convert_sync_batchnorm", "freeze"]
__all__ += ["DomainBatchNorm", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d", "use_domain"]
__all__ += ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormBase"]
