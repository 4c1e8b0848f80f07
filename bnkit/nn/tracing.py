"""torch.fx symbolic tracing: a bnkit layer is a leaf module, as torch.nn's batch norm is.

``torch.fx.Tracer`` records a module from the ``torch.nn`` namespace as one ``call_module`` node
(a *leaf*) and traces through every other module's ``forward`` with ``fx.Proxy`` values in place
of tensors. A bnkit layer's forward checks its input and chooses its route in Python, which a
Proxy cannot answer, so tracing through it fails. Instead, when the forward receives a Proxy it
emits the ``call_module`` node itself, exactly the node the tracer emits for a leaf: the traced
graph calls the real layer at run time, so every option (``mask=``, ghost batches, activations,
the non-finite policy, train and eval) computes what the layer computes, and tools built on
tracing (torchvision's ``create_feature_extractor``/``get_graph_node_names``, FX quantization)
see one node per layer, named by its path in the model.

Refused, with an error naming the layer: tracing a bnkit layer as the root (there is no parent
module for the node to call; wrap it, e.g. ``torch.nn.Sequential(layer)``), and a layer with
forward (pre-)hooks: the tracer runs them on Proxies while recording, and the graph runs them
again inside the layer's call, so they would apply twice (torch.nn leaves run them once).
"""
from __future__ import annotations

import torch
from torch import fx

__all__ = ["traced_call"]


def traced_call(layer: torch.nn.Module, input, mask=None, lengths=None):
    """The ``call_module`` Proxy for ``layer(input, mask=mask, lengths=lengths)`` when an argument is an
    ``fx.Proxy``, else None (a few isinstance checks: this runs at every forward).

    ``None`` keyword arguments are left out of the node, so a plain call records ``layer(x)`` as
    torch.nn's does.
    """
    if not (isinstance(input, fx.Proxy) or isinstance(mask, fx.Proxy) or isinstance(lengths, fx.Proxy)):
        return None
    kwargs = {k: v for k, v in (("mask", mask), ("lengths", lengths)) if v is not None}
    tracer = next(a for a in (input, mask, lengths) if isinstance(a, fx.Proxy)).tracer
    name = layer.layer_name
    try:
        path = tracer.path_of_module(layer)
    except NameError:
        raise RuntimeError(f"{name}: torch.fx is tracing a model that does not hold this layer as a submodule; "
                           f"a bnkit layer is recorded as a call to its submodule path") from None
    if path == "":
        raise RuntimeError(f"{name}: torch.fx records a bnkit layer as a leaf module of the model it traces, and "
                           f"this layer is the root; trace a module that holds it, e.g. "
                           f"torch.fx.symbolic_trace(torch.nn.Sequential(layer))")
    if layer._forward_pre_hooks or layer._forward_hooks:
        raise RuntimeError(f"{name} ({path}): has forward hooks, which torch.fx would record on Proxies and the "
                           f"traced graph would run again inside the layer's call; remove them before tracing")
    return tracer.create_proxy("call_module", path, (input,), kwargs)
