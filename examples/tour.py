"""A short runnable tour of bnkit's foundation: drop-in layers, momentum conventions, frozen statistics."""
import torch

import bnkit

torch.manual_seed(0)
x = torch.randn(32, 8, 16, 16) * 3 + 5

# 1. Drop-in: the same numbers and state_dict as torch.nn.
ours, theirs = bnkit.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
y_ours, y_theirs = ours(x), theirs(x)
print("max |bnkit - torch.nn| output:", (y_ours - y_theirs).abs().max().item())
print("running_var equal:", torch.allclose(ours.running_var, theirs.running_var))
theirs.load_state_dict(ours.state_dict())

# 2. Momentum without ambiguity.
keras_like = bnkit.BatchNorm2d(8, momentum=bnkit.momentum.Decay(0.99))   # Keras/TF momentum=0.99
print("Decay(0.99) is torch momentum", keras_like.momentum)
print("HalfLife(10) steps is torch momentum", round(bnkit.BatchNorm2d(8, momentum=bnkit.momentum.HalfLife(10)).momentum, 5))
print("bnkit.momentum.convert(0.99, 'decay', 'momentum') =", bnkit.momentum.convert(0.99, "decay", "momentum"))

# 3. Frozen statistics survive model.train().
model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), bnkit.BatchNorm2d(8), torch.nn.ReLU())
bnkit.freeze_stats(model)
model.train()
before = model[1].running_mean.clone()
model(x)
print("running_mean unchanged while frozen:", torch.equal(before, model[1].running_mean))
