"""The adapter kinds: one module each, and the one registry below.

An adapter kind is a ``torch.nn.Module`` class built as ``Kind(dim, out_dim, config)`` (the wrapped
layer's input and output token widths, the :class:`agd_pipeline.adapters.AdapterConfig`) whose
``forward(tokens, cond)`` returns a residual for the layer's output from its input tokens and the
embedded condition (:class:`agd_pipeline.adapters.Condition`), through an output layer initialised
to zero (:func:`agd_pipeline.adapter_kinds.layers.zero_init`), so that fresh adapters leave the base
unchanged.

Adding a kind is a new module here and one entry in ``ADAPTER_KINDS``: ``train.adapter``'s choices,
the adapter-config check and the tests follow from the registry. The registry names each class by
``module:Class`` so that reading it (the stage configs do, for ``--help``) imports no torch.
"""

from __future__ import annotations

import importlib

from ..errors import ModelError

# name (recorded in adapter_config.json: never rename one) -> "module:Class" in this package
ADAPTER_KINDS: dict[str, str] = {
    "bottleneck": "bottleneck:BottleneckAdapter",
    "offset": "offset:OffsetAdapter",
    "cross_attention": "cross_attention:CrossAttentionAdapter",
}


def adapter_class(kind: str) -> type:
    """The module class of adapter kind ``kind``."""
    if kind not in ADAPTER_KINDS:
        raise ModelError(f"unknown adapter kind {kind!r}; allowed: {', '.join(ADAPTER_KINDS)}")
    module, _, name = ADAPTER_KINDS[kind].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
