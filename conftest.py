"""Without Triton (an optional extra) the kernel sources cannot be imported for doctest collection."""
import importlib.util

collect_ignore = [] if importlib.util.find_spec("triton") else ["bnkit/ops/triton"]
