"""Statistics: momentum conventions, running-statistic updates, stable moments and merges."""
from . import momentum
from .ghost import chunk_sizes, ghost_moments, ghost_statistics, pooled_moments
from .moments import (Moments, accumulation_dtype, batch_moments, example_weighted_moments, masked_moments,
                      reduce_dims)
from .running import ema, update_running_stats

__all__ = ["momentum", "Moments", "accumulation_dtype", "batch_moments", "example_weighted_moments", "masked_moments",
           "reduce_dims", "update_running_stats", "ema", "chunk_sizes", "ghost_moments",
           "ghost_statistics", "pooled_moments"]
