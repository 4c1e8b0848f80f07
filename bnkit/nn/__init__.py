"""The modules users hold."""
from .batchnorm import STATS_FROZEN_MODES, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .sync import SyncBatchNorm
from .domain import DomainBatchNorm, DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d, use_domain
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormBase, LinearRamp, renorm_warmup

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "STATS_FROZEN_MODES"]
__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormBase", "LinearRamp", "renorm_warmup"]
__all__ += ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "SyncBatchNorm"]
__all__ += ["DomainBatchNorm", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d", "use_domain"]
