"""STAND-IN for ``bnkit.calibrate`` (issue 3, built on another branch), used ONLY while it is missing.

The ``calibrate`` fixture in conftest.py installs this module as ``bnkit.calibrate`` when the real
one cannot be imported; once the real one is merged, the fixture uses it and this file can go.
It implements only what bnkit.doctor and ``bnkit demo`` need from ``mode="precise"``: the pooled
(Chan-merged) statistics of every batch-norm layer's input over the data, with upstream layers
normalizing with batch statistics, written to running_mean / running_var (unbiased).
"""
import torch

from bnkit import batch_norm_layers, frozen_stats
from bnkit.stats import Moments


@torch.no_grad()
def calibrate(model, data, num_samples=None, num_batches=200, mode="precise", forward=None, progress=True):
    assert mode == "precise", "the stand-in implements mode='precise' only"
    layers = batch_norm_layers(model)
    moments = {}

    def pre_hook(module, args):
        m = Moments.of(args[0])
        moments[module] = moments[module].merge(m) if module in moments else m

    handles = [m.register_forward_pre_hook(pre_hook) for _, m in layers]
    was_training = model.training
    model.train()
    try:
        with frozen_stats(model):
            for i, batch in enumerate(data):
                if i >= num_batches:
                    break
                if forward is not None:
                    forward(model, batch)
                else:
                    model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for _, m in layers:
        if m in moments and m.running_mean is not None:
            m.running_mean.copy_(moments[m].mean)
            m.running_var.copy_(moments[m].var(unbiased=True))
    return {name: int(moments[m].count[0]) for name, m in layers if m in moments}
