"""Where bnkit's Triton kernels beat torch's own batch norm on a GPU, by measurement.

Backend ``"auto"`` sends a CUDA tensor to the kernels only when a row below matches it; everything
else takes torch's kernel. A row is kept only when the kernels were measured at least
``MIN_SPEEDUP`` times faster than torch.nn eager (BN+ReLU, forward + backward in training, the
forward in eval) on every shape it stands for. Re-measure with the command below on a GPU (its
"vs eager" column) and replace the rows.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["DEVICE", "CAPABILITY", "DATE", "COMMAND", "MIN_SPEEDUP", "Row", "ROWS", "matching_row"]

DEVICE = "one NVIDIA H200 (4.22 TB/s device copy), PyTorch 2.11, Triton 3.6"
#: The CUDA compute capability the rows were measured on (Hopper: H100, H200). Backend "auto" reads the
#: table only on GPUs of this capability; other GPUs take torch's kernel until they are measured.
CAPABILITY = (9, 0)
DATE = "2026-11-30"
COMMAND = ("python benchmarks/bench_kernels.py (triton.testing.do_bench medians, BN+ReLU, bnkit at commit 8a0339c "
           "with nonfinite='propagate'); the numbers are in benchmarks/RESULTS.md")
MIN_SPEEDUP = 1.10


class Row(NamedTuple):
    """A region of configurations: ``mode`` ("train" or "eval"), ``layout`` ("nchw": the spatial axis
    is contiguous; "nhwc": the channels are), dtypes (names as in ``torch.bfloat16``), at least
    ``min_elements`` elements, at most ``max_channels`` channels (None: any), and the evidence: the
    smallest measured speedup over eager and where it comes from."""
    mode: str
    layout: str
    dtypes: tuple[str, ...]
    min_elements: int
    max_channels: int | None
    speedup: float
    evidence: str


ROWS = (
    Row("train", "nchw", ("bfloat16", "float16", "float32"), 2**27, None, 3.7,
        "bf16 256x64x112x112: eager 9317 us, kernels 1013 us (9.2x); bf16 256x256x56x56: 3527 vs 957 us (3.7x). "
        "fp16/fp32 not timed against the kernels: eager's NCHW training kernels (grid = C) reached 8-22% (bf16) "
        "and 21-48% (fp32) of copy bandwidth on these shapes, the kernels move the same bytes at ~77%"),
    Row("train", "nhwc", ("bfloat16",), 2**27, 64, 1.38,
        "bf16 256x64x112x112 channels_last: eager 2566 us, kernels 1857 us. Other channels_last shapes lost "
        "(256x256x56x56 fp32 1.06x, 256x1024x14x14 bf16 0.63x, 256x2048x7x7 bf16 0.23x)"),
    Row("eval", "nchw", ("bfloat16", "float32"), 2**27, None, 2.0,
        "256x64x112x112 and 256x256x56x56: kernels at 83-93% of copy bandwidth, 2-3x eager"),
    Row("eval", "nhwc", ("bfloat16", "float32"), 2**27, None, 2.0,
        "256x64x112x112 and 256x256x56x56: kernels at 83-93% of copy bandwidth, 2-3x eager"),
)


def matching_row(mode: str, layout: str | None, dtype: str, elements: int, channels: int) -> Row | None:
    """The row that sends this configuration to the kernels, or None (torch's kernel)."""
    for row in ROWS:
        if row.mode == mode and row.layout == layout and dtype in row.dtypes and elements >= row.min_elements \
                and (row.max_channels is None or channels <= row.max_channels) and row.speedup >= MIN_SPEEDUP:
            return row
    return None
