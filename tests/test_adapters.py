"""Adapters: exact no-op when fresh, hooks that never touch the base's own call, save/load."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import agd_pipeline.adapters as adapters_module
from agd_pipeline.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedModel, AdapterConfig,
                                   load_adapted_model, save_adapters)
from agd_pipeline.errors import ModelError, WriteError
from agd_pipeline.models import count_parameters, load_base_model

from conftest import make_base_folder

KINDS = ("bottleneck", "offset", "cross_attention")
# every placement the library defines for DiT (at least these two)
PLACEMENTS = tuple(adapters_module.PLACEMENTS["dit"])
assert {"attention", "block"} <= set(PLACEMENTS)
COMBOS = list(itertools.product(KINDS, PLACEMENTS))


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    t = torch.tensor([999, 800, 500, 300, 100, 1])
    labels = torch.tensor([0, 1, 2, 3, 9, 10])  # includes the null class
    w = torch.tensor([1.0, 1.5, 2.0, 3.0, 4.5, 6.0])
    return x, t, labels, w


def config(kind, placement, **kw):
    return AdapterConfig(kind=kind, placement=placement, width=8, embed_dim=16, num_classes=10, **kw)


@pytest.fixture
def adapted_factory(base):
    """Builds AdaptedModels on the shared base and always removes their hooks afterwards."""
    made = []

    def make(kind="bottleneck", placement="attention", seed=0, **kw):
        torch.manual_seed(seed)
        model = AdaptedModel(base, config(kind, placement, **kw))
        made.append(model)
        return model

    yield make
    for model in made:
        model.remove()


def train_one_step(model, inputs, lr=1e-2):
    x, t, labels, w = inputs
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.nn.functional.mse_loss(model(x, t, labels, w), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()


def base_output(base, inputs):
    x, t, labels, _ = inputs
    with torch.no_grad():
        return base.predict(x, t, labels)


@pytest.mark.parametrize("kind,placement", COMBOS)
def test_fresh_adapter_reproduces_base_exactly(base, inputs, adapted_factory, kind, placement):
    reference = base_output(base, inputs)
    model = adapted_factory(kind, placement)
    with torch.no_grad():
        out = model(*inputs)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("kind,placement", COMBOS)
def test_trained_adapter_changes_output_but_never_the_base(base, inputs, adapted_factory, kind, placement):
    reference = base_output(base, inputs)
    fingerprint = base.weights_fingerprint()
    model = adapted_factory(kind, placement)
    train_one_step(model, inputs)
    assert not base.net.training, "the base must stay in eval(): DiT drops labels in train mode"
    assert all(p.grad is None for p in base.net.parameters()), "gradients reached the frozen base"
    with torch.no_grad():
        adapted = model(*inputs)
    assert (adapted - reference).abs().max() > 1e-6, "one optimiser step left the adapters a no-op"
    # The base called on its own, adapters still attached: exactly as loaded.
    assert torch.equal(base_output(base, inputs), reference)
    model.remove()
    assert torch.equal(base_output(base, inputs), reference)
    with torch.no_grad():
        assert torch.equal(model(*inputs), reference), "remove() left a hook behind"
    # the weights themselves are untouched (recomputed, not the cached fingerprint)
    base.info.pop("weights_fingerprint", None)
    assert base.weights_fingerprint() == fingerprint


@pytest.mark.parametrize("kind,placement", COMBOS)
def test_state_dict_holds_only_adapter_tensors(base, adapted_factory, kind, placement):
    model = adapted_factory(kind, placement)
    state = model.state_dict()
    base_keys = set(base.net.state_dict())
    assert state, "empty adapter state dict"
    assert not set(state) & base_keys
    assert all(k.startswith(("embedding.", "adapters.")) for k in state), sorted(state)
    base_storage = {p.data_ptr() for p in base.net.state_dict().values()}
    assert not {v.data_ptr() for v in state.values()} & base_storage
    assert sum(v.numel() for v in state.values()) == count_parameters(model)
    assert count_parameters(model) < count_parameters(base.net)
    assert len(model.adapters) == len(model.target_names) >= len(base.net.transformer_blocks)


@pytest.mark.parametrize("kind,placement", [("bottleneck", "attention"), ("offset", "block"),
                                            ("cross_attention", "attention")])
def test_save_load_round_trip(base, inputs, adapted_factory, tmp_path, kind, placement):
    reference = base_output(base, inputs)
    model = adapted_factory(kind, placement, condition_on=["guidance", "class"])
    train_one_step(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
    save_adapters(model, tmp_path)
    assert (tmp_path / ADAPTER_WEIGHTS).exists() and (tmp_path / ADAPTER_CONFIG).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same base: no warning
        loaded = load_adapted_model(tmp_path, base)
    try:
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(*inputs), expected)
        # two adapted models on one base do not see each other's condition
        with torch.no_grad():
            assert torch.equal(model(*inputs), expected)
            assert torch.equal(base_output(base, inputs), reference)
    finally:
        loaded.remove()


@pytest.mark.bad_input
def test_load_refuses_other_architecture(base, adapted_factory, tmp_path):
    model = adapted_factory()
    save_adapters(model, tmp_path / "adapters")
    other_dir = make_base_folder(tmp_path / "other_base", seed=0, num_layers=3)
    other = load_base_model(str(other_dir))
    with pytest.raises(ModelError) as err:
        load_adapted_model(tmp_path / "adapters", other)
    message = str(err.value)
    assert str(base.model_id) in message and str(other_dir) in message
    assert base.architecture_fingerprint() in message and other.architecture_fingerprint() in message


def test_load_warns_on_same_architecture_with_other_weights(base, inputs, adapted_factory, tmp_path):
    model = adapted_factory()
    train_one_step(model, inputs)
    save_adapters(model, tmp_path / "adapters")
    finetune_dir = make_base_folder(tmp_path / "finetune", seed=1)
    finetune = load_base_model(str(finetune_dir))
    assert finetune.architecture_fingerprint() == base.architecture_fingerprint()
    assert finetune.weights_fingerprint() != base.weights_fingerprint()
    with pytest.warns(UserWarning, match="different weights"):
        loaded = load_adapted_model(tmp_path / "adapters", finetune)
    # the adapter tensors are the trained ones
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    loaded.remove()


def test_load_rejects_non_adapter_folder(base, tmp_path):
    with pytest.raises(ModelError, match=ADAPTER_CONFIG):
        load_adapted_model(tmp_path, base)


@pytest.mark.bad_input
def test_unknown_kind_and_placement_are_refused(base):
    with pytest.raises(ModelError, match="kind"):
        AdaptedModel(base, config("lora", "attention"))
    with pytest.raises(ModelError, match="placement"):
        AdaptedModel(base, config("offset", "everywhere"))


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_gate_switches_adapters_off_at_w_one(base, inputs, adapted_factory, kind):
    """With the guidance gate, even trained adapters are exactly the base at w = 1 (no guidance)."""
    import dataclasses

    if "guidance_gate" not in {f.name for f in dataclasses.fields(AdapterConfig)}:
        pytest.skip("this AdapterConfig has no guidance gate")
    x, t, labels, _ = inputs
    model = adapted_factory(kind, "attention", guidance_gate=True)
    train_one_step(model, inputs)
    reference = base_output(base, inputs)
    with torch.no_grad():
        at_one = model(x, t, labels, torch.ones(len(x)))
        at_three = model(x, t, labels, torch.full((len(x),), 3.0))
    assert torch.equal(at_one, reference)
    assert (at_three - reference).abs().max() > 1e-6


# ------------------------------------------------------------------ integrity of adapter folders


def _saved(adapted_factory, inputs, folder, seed=0):
    model = adapted_factory(seed=seed)
    train_one_step(model, inputs)
    save_adapters(model, folder)
    return folder


def _edit_config(folder, edit):
    import json

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    edit(config)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def test_saved_folder_records_sha256_of_weights_and_config(adapted_factory, inputs, tmp_path):
    import hashlib
    import json

    folder = _saved(adapted_factory, inputs, tmp_path / "a")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    integrity = config["integrity"]
    assert integrity["files"][ADAPTER_WEIGHTS] == hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    assert integrity["config"] == adapters_module.config_digest(config)
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG, "README.md", ADAPTER_WEIGHTS])


@pytest.mark.bad_input
def test_flipped_weight_bytes_are_refused_naming_the_file(base, adapted_factory, inputs, tmp_path):
    folder = _saved(adapted_factory, inputs, tmp_path / "a")
    data = bytearray((folder / ADAPTER_WEIGHTS).read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor's data: a valid safetensors file all the same
    (folder / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"{ADAPTER_WEIGHTS}: its bytes differ from the sha256"):
        load_adapted_model(folder, base)


@pytest.mark.bad_input
def test_weights_of_another_run_are_refused(base, adapted_factory, inputs, tmp_path):
    """Same shapes, same config otherwise: only the digest tells the two runs' weights apart."""
    first = _saved(adapted_factory, inputs, tmp_path / "a", seed=0)
    second = _saved(adapted_factory, inputs, tmp_path / "b", seed=1)
    (first / ADAPTER_WEIGHTS).write_bytes((second / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ModelError, match="replaced by other weights"):
        load_adapted_model(first, base)


@pytest.mark.bad_input
@pytest.mark.parametrize("edit", [
    lambda c: c["adapter"].update(guidance_scale_unit=c["adapter"]["guidance_scale_unit"] * 2),
    lambda c: c["adapter"].update(guidance_gate=not c["adapter"]["guidance_gate"]),
    lambda c: c.update(guidance={"min": 1.0, "max": 9.0}),
    lambda c: c.update(sampler={"num_steps": 7}),
    lambda c: c["base_model"].update(id="someone/else"),
], ids=["guidance_scale_unit", "guidance_gate", "guidance range", "sampler.num_steps", "base id"])
def test_edited_config_values_are_refused(base, adapted_factory, inputs, tmp_path, edit):
    """Values that are valid on their own, so only the recorded digest can tell they were edited."""
    from agd_pipeline.adapters import read_adapter_config
    from agd_pipeline.pipelines import AGDAdapters

    folder = _saved(adapted_factory, inputs, tmp_path / "a")
    read_adapter_config(folder)  # untouched: reads
    _edit_config(folder, edit)
    for load in (read_adapter_config, AGDAdapters.from_pretrained, lambda f: load_adapted_model(f, base)):
        with pytest.raises(ModelError, match=f"{ADAPTER_CONFIG}: its contents differ from the sha256"):
            load(folder)


def test_reformatted_config_still_loads(base, adapted_factory, inputs, tmp_path):
    """The digest is over the parsed content: indentation or key order do not matter."""
    folder = _saved(adapted_factory, inputs, tmp_path / "a")
    _edit_config(folder, lambda c: None)  # rewritten with other whitespace
    import json

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(reversed(list(config.items())))))
    load_adapted_model(folder, base).remove()


@pytest.mark.bad_input
def test_missing_integrity_is_refused_and_an_old_folder_warns(base, adapted_factory, inputs, tmp_path):
    folder = _saved(adapted_factory, inputs, tmp_path / "a")
    _edit_config(folder, lambda c: c.pop("integrity"))
    with pytest.raises(ModelError, match='"integrity" must hold the sha256'):
        load_adapted_model(folder, base)
    _edit_config(folder, lambda c: c.update(format_version=1))  # as the tool wrote them before digests
    with pytest.warns(UserWarning, match="without digests"):
        load_adapted_model(folder, base).remove()


@pytest.mark.parametrize("fail_at", ["weights", "config"])
def test_a_failed_save_leaves_the_previous_adapters_whole(base, adapted_factory, inputs, tmp_path, monkeypatch,
                                                          fail_at):
    import errno

    from safetensors import SafetensorError

    folder = _saved(adapted_factory, inputs, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    newer = adapted_factory(seed=3)
    train_one_step(newer, inputs)
    if fail_at == "weights":  # safetensors reports a full disk as its own error type, not OSError
        def save_file(*args, **kwargs):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
        monkeypatch.setattr(adapters_module, "save_file", save_file)
    else:
        real_write_text = type(folder).write_text

        def write_text(self, *args, **kwargs):
            if self.name.endswith(".tmp"):
                real_write_text(self, "{")  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write_text(self, *args, **kwargs)
        monkeypatch.setattr(type(folder), "write_text", write_text)
    with pytest.raises(WriteError, match="cannot write the adapters \\(the disk is full\\); nothing there was"):
        save_adapters(newer, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporaries, nothing replaced
    load_adapted_model(folder, base).remove()
