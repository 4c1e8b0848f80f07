"""The modules users hold."""
from .batchnorm import STATS_FROZEN_MODES, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase, nonfinite_report
from .domain import DomainBatchNorm, DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d, use_domain
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostBatchNormBase
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormBase, LinearRamp, renorm_warmup
from .sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "STATS_FROZEN_MODES", "nonfinite_report",
           "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]
__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormBase", "LinearRamp", "renorm_warmup"]
__all__ += ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "SyncBatchNorm"]
__all__ += ["DomainBatchNorm", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d", "use_domain"]
__all__ += ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormBase"]
