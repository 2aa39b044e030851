"""Memory of adapter training on a frozen base: gradient checkpointing through the base with the
adapters' condition restored while a block is recomputed, and exact byte counts of what a training
step keeps (weights, gradients, optimizer state) from a model's parameters, on any device (the meta
device included, so full-size models are counted without memory).

Gradient checkpointing and the adapters: the adapters' hooks read the condition of the current call
(:meth:`AdaptedModel.conditioned`), which is gone when backward recomputes a checkpointed block. A
plain ``enable_gradient_checkpointing()`` would recompute those blocks *without* the adapters, and
torch stops with "a different number of tensors was saved". :func:`enable_base_checkpointing`
hands diffusers a checkpoint function whose recomputation runs inside the condition of the call that
made the forward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import ModelError

ADAM_STATES = 2  # AdamW keeps exp_avg and exp_avg_sq, each the shape and dtype of its parameter


def enable_base_checkpointing(model) -> None:
    """Recompute the frozen base's blocks in backward (diffusers' block-level checkpointing) for an
    :class:`~agd_pipeline.adapters.AdaptedModel`, its adapters included in the recomputation."""
    from torch.utils.checkpoint import checkpoint

    net = model.base.net
    if not getattr(net, "_supports_gradient_checkpointing", False):
        raise ModelError(f"{type(net).__name__} does not support gradient checkpointing; train without it")

    def checkpointed(block, *args):
        condition = model._condition  # the call being made now; backward recomputes inside it again
        return checkpoint(block.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), model.conditioned(condition)))

    net.enable_gradient_checkpointing(checkpointed)


def disable_base_checkpointing(model) -> None:
    model.base.net.disable_gradient_checkpointing()


def _bytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def training_bytes(*modules: nn.Module) -> dict:
    """What a training step with AdamW keeps besides activations, counted exactly from the
    parameters (shared ones once): every weight, a gradient and two Adam states per trainable one,
    each in its parameter's dtype (as torch keeps them)."""
    seen, weights, trainable = set(), [], []
    for module in modules:
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            weights.append(p)
            if p.requires_grad:
                trainable.append(p)
    return {"parameters": sum(p.numel() for p in weights), "trainable_parameters": sum(p.numel() for p in trainable),
            "weight_bytes": _bytes(weights), "gradient_bytes": _bytes(trainable),
            "optimizer_bytes": ADAM_STATES * _bytes(trainable)}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds now (measured, after at least one step)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0)


def largest_batch(capacity_bytes: float, static_bytes: float, per_sample_bytes: float) -> int:
    """The largest batch whose memory static + batch x per_sample fits in ``capacity_bytes`` (0: none)."""
    if per_sample_bytes <= 0:
        raise ValueError("per_sample_bytes must be positive")
    return max(0, int((capacity_bytes - static_bytes) // per_sample_bytes))
