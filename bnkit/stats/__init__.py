"""Statistics: momentum conventions, running-statistic updates, stable moments and merges."""
from . import momentum
from .ghost import chunk_sizes, ghost_moments, ghost_statistics, pooled_moments
from .moments import Moments, accumulation_dtype, batch_moments, reduce_dims, unbiased_factor
from .running import update_running_stats

__all__ = ["momentum", "Moments", "accumulation_dtype", "batch_moments", "reduce_dims", "unbiased_factor",
           "update_running_stats", "chunk_sizes", "ghost_moments", "ghost_statistics", "pooled_moments"]
