"""What the adapter kinds share."""

from torch import nn


def zero_init(layer: nn.Linear) -> nn.Linear:
    """``layer`` with its weight and bias set to zero: an adapter's output layer, so that a fresh
    adapter adds nothing."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
