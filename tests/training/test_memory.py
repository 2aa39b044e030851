"""Gradient checkpointing through the frozen base with adapters in it, exact training-byte counts
and the GPU projection, on tiny models of every family; the training benchmark on a toy DiT."""

from __future__ import annotations

import json

import pytest
import torch

from agd_pipeline.adapters import AdaptedModel, AdapterConfig, default_condition_on, resolve_placement
from agd_pipeline.inference import encode_prompts
from agd_pipeline.memory import (enable_base_checkpointing, disable_base_checkpointing, largest_batch,
                                 optimizer_state_bytes, training_bytes)
from agd_pipeline.models import load_base_model

from conftest import run_main
from tiny_pipelines import FAMILY_NAMES

PROMPTS = ["a red cat", "blue sky"]


@pytest.fixture(scope="module")
def bases(text_pipeline_dirs, tiny_base_dir):
    return {"dit": load_base_model(str(tiny_base_dir), with_vae=False),
            **{name: load_base_model(str(folder), with_vae=False) for name, folder in text_pipeline_dirs.items()}}


def inputs(base):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *base.latent_shape, generator=generator)
    t = torch.tensor([700, 150])
    w = torch.tensor([2.0, 4.5])
    if base.conditioning == "class":
        return x, t, base.class_condition(torch.tensor([1, 3])), w, {}
    cond, _ = encode_prompts(base, PROMPTS)
    pooled = cond.get("pooled_prompt_embeds")
    return x, t, cond, w, {"text_dim": cond["prompt_embeds"].shape[-1],
                           "pooled_dim": 0 if pooled is None else pooled.shape[-1]}


def adapted(base, kind, widths):
    config = AdapterConfig(kind=kind, placement=resolve_placement(base.family, "auto"), width=8, embed_dim=16,
                           num_classes=base.num_classes, condition_on=default_condition_on(base.conditioning),
                           **widths)
    torch.manual_seed(0)
    model = AdaptedModel(base, config).train()
    with torch.no_grad():  # away from the zero init, so every adapter parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def gradients(model, x, t, cond, w):
    model.zero_grad(set_to_none=True)
    output = model(x, t, cond, w)
    output.float().pow(2).mean().backward()
    return output.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind", ["bottleneck", "cross_attention"])
def test_checkpointing_through_the_base_gives_the_same_gradients(bases, family, kind):
    base = bases[family]
    x, t, cond, w, widths = inputs(base)
    model = adapted(base, kind, widths)
    try:
        output, expected = gradients(model, x, t, cond, w)
        assert all(g.abs().sum() > 0 for g in expected.values()), "a vacuous comparison: zero gradients"
        enable_base_checkpointing(model)
        assert base.net.is_gradient_checkpointing
        recomputed_output, recomputed = gradients(model, x, t, cond, w)
        torch.testing.assert_close(recomputed_output, output, rtol=0, atol=0)
        for name, grad in expected.items():
            torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        disable_base_checkpointing(model)
        model.remove()


def test_diffusers_own_checkpointing_drops_the_adapters_in_the_recomputation(bases):
    """Why enable_base_checkpointing exists: diffusers' default checkpoint function recomputes the
    blocks after the call's condition is gone, so the adapters are missing from the recomputation."""
    base = bases["dit"]
    x, t, cond, w, widths = inputs(base)
    model = adapted(base, "bottleneck", widths)
    try:
        gradients(model, x, t, cond, w)  # without checkpointing: fine
        base.net.enable_gradient_checkpointing()
        with pytest.raises(RuntimeError, match="different number of tensors was saved"):
            gradients(model, x, t, cond, w)
    finally:
        base.net.disable_gradient_checkpointing()
        model.remove()


def test_training_bytes_count_weights_gradients_and_adam_state(bases):
    base = bases["dit"]
    model = adapted(base, "bottleneck", {})
    try:
        n_base = sum(p.numel() for p in base.net.parameters())
        n_adapter = sum(p.numel() for p in model.parameters())
        counted = training_bytes(model, base.net)
        assert counted == {"parameters": n_base + n_adapter, "trainable_parameters": n_adapter,
                           "weight_bytes": 4 * (n_base + n_adapter), "gradient_bytes": 4 * n_adapter,
                           "optimizer_bytes": 8 * n_adapter}
        # what AdamW really holds after a step is what was counted
        optimizer = torch.optim.AdamW(model.parameters())
        x, t, cond, w, _ = inputs(base)
        model(x, t, cond, w).pow(2).mean().backward()
        optimizer.step()
        assert optimizer_state_bytes(optimizer) == counted["optimizer_bytes"]
    finally:
        model.remove()
    assert training_bytes(torch.nn.Linear(3, 2).to(torch.bfloat16))["weight_bytes"] == 2 * 8


def test_largest_batch():
    assert largest_batch(100, 30, 7) == 10
    assert largest_batch(100, 120, 7) == 0
    with pytest.raises(ValueError):
        largest_batch(100, 30, 0)


@pytest.mark.slow
def test_training_benchmark_measures_every_mode_on_a_toy_dit(tmp_path):
    out = tmp_path / "training.json"
    result = run_main("stages.benchmark", "training", "--architectures", "toy-dit-8x8", "--repeats", "1",
                      "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["agd-fp32", "agd-bf16", "agd-fp32-ckpt", "agd-bf16-ckpt", "full-fp32",
                                         "full-fp32-ckpt"]
    agd, full = rows[0], rows[-2]
    # the checkpointed peer: the same trainable parameters and optimizer state as full-fp32, measured
    assert rows[-1]["measured"] and rows[-1]["optimizer_bytes"] == full["optimizer_bytes"]
    measured = [r for r in rows if "bf16" not in r["mode"]]
    assert all(r["measured"] and r["seconds_per_step"] > 0 for r in measured)
    # on a CPU the bf16 modes are computed: exact bytes, their fp32 twin's activations at half the size
    bf16 = {r["mode"]: r for r in rows if "bf16" in r["mode"]}
    assert not bf16["agd-bf16"]["measured"] and bf16["agd-bf16"]["activation_from"].startswith("agd-fp32 ")
    assert bf16["agd-bf16-ckpt"]["activation_bytes"] == rows[2]["activation_bytes"] / 2
    assert agd["trainable_parameters"] < full["trainable_parameters"] == full["parameters"]
    assert full["optimizer_bytes"] == 8 * full["parameters"] == full["measured_optimizer_bytes"]
    assert rows[1]["weight_bytes"] < agd["weight_bytes"]  # the base in bf16
    assert "| toy-dit-8x8 | full-fp32 |" in result.stdout
    bad = run_main("stages.benchmark", "training", "--modes", "agd-fp64")
    assert bad.returncode == 2 and "unknown mode 'agd-fp64'" in bad.stderr
