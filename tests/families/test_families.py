"""The families registry: every family is detected from its pipeline and its denoiser, offers
placements that build on a tiny model of it, and unknown models are refused with the supported list."""

from __future__ import annotations

import json
import shutil

import pytest

from agd_pipeline import families
from agd_pipeline.adapters import ALL_PLACEMENTS, PLACEMENTS, AdaptedModel, AdapterConfig, adapter_targets
from agd_pipeline.adapters import resolve_placement
from agd_pipeline.errors import ModelError
from agd_pipeline.models import load_base_model

from tiny_pipelines import FAMILY_NAMES, TINY_BUILDERS, tiny_builder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model of every registered family, from its builder in tests/tiny_pipelines.py."""
    root = tmp_path_factory.mktemp("family_pipelines")
    return {name: tiny_builder(name)(root / name) for name in FAMILY_NAMES}


@pytest.fixture(scope="module")
def bases(folders):
    return {name: load_base_model(str(folder)) for name, folder in folders.items()}


def test_every_family_has_a_tiny_model_here(folders):
    # a family added to the registry needs a tiny model in this file (and in the parity tests)
    assert set(folders) == set(families.BY_NAME)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_registered_family_has_a_tiny_builder(family):
    # the per-family tests are parametrized from the registry and build each family's tiny model
    # by its name: a registered family without one fails here, by name
    assert family in TINY_BUILDERS, (f"the registered family '{family}' has no tiny model builder: "
                                     "add one to TINY_BUILDERS in tests/tiny_pipelines.py")


def test_names_pipelines_and_denoisers_are_unique():
    names = [f.name for f in families.FAMILIES]
    assert len(names) == len(set(names)) and set(names) == {"dit", "sd", "sdxl", "sd3"}  # recorded names
    pipelines = [p for f in families.FAMILIES for p in f.pipelines]
    assert len(pipelines) == len(set(pipelines))
    # a denoiser class belongs to one family; families sharing it refine that one by its config
    general = [d for f in families.FAMILIES if f.refines is None for d in f.denoisers]
    assert len(general) == len(set(general))
    for family in families.FAMILIES:
        assert family.pipelines and family.placements and family.condition_names
        assert family.conditioning in ("class", "text")
        assert family.denoiser_folder in families.DENOISER_FOLDERS
        if family.refines is not None:
            parent = families.get(family.refines)
            assert parent.refines is None and parent.denoiser_folder == family.denoiser_folder


def test_every_family_is_detected_from_its_pipeline_and_its_denoiser(bases):
    for name, base in bases.items():
        family = families.get(name)
        assert base.family == name and base.spec is family
        for pipeline in family.pipelines:
            assert families.from_pipeline(pipeline) is family
            assert families.detect(pipeline, [None, None]) is family
        net_class = type(base.net).__name__
        assert net_class in family.denoisers or net_class in families.get(family.refines).denoisers
        assert families.from_denoiser(net_class, base.net.config) is family
        assert families.refine(families.detect(None, [net_class]), base.net.config) is family


def test_folders_without_model_index_are_detected_from_their_denoiser(folders, tmp_path):
    for name, folder in folders.items():
        bare = shutil.copytree(folder, tmp_path / name)
        (bare / "model_index.json").unlink()
        assert load_base_model(str(bare), with_vae=False).family == name  # a bare SDXL UNet: by its config


def test_placements_build_targets_on_a_tiny_model_of_each_family(bases):
    assert PLACEMENTS == {f.name: f.placements for f in families.FAMILIES}
    for name, base in bases.items():
        family = base.spec
        assert resolve_placement(name, "auto") == family.placements[0]
        assert set(family.placements) <= set(ALL_PLACEMENTS)
        for placement in family.placements:
            targets = adapter_targets(base, placement)
            assert targets, (name, placement)
            modules = dict(base.net.named_modules())
            for layer, module, dim, out_dim in targets:
                assert modules[layer] is module and dim > 0 and out_dim > 0
            if placement.endswith("+output"):
                assert targets[-1][1] is family.output_layer(base.net)
            config = AdapterConfig(kind="bottleneck", placement=placement, width=4, embed_dim=8,
                                   condition_on=["guidance", "timestep"])
            AdaptedModel(base, config).remove()  # every target takes an adapter of its widths
        others = sorted(set(ALL_PLACEMENTS[1:]) - set(family.placements))
        for placement in others:
            with pytest.raises(ModelError, match=f"not defined for the '{name}' family"):
                adapter_targets(base, placement)


@pytest.mark.bad_input
def test_unknown_models_are_refused_with_the_supported_list(tmp_path):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelError) as caught:
        load_base_model(str(folder))
    message = str(caught.value)
    assert "FluxPipeline" in message and "Supported families:" in message
    for family in families.FAMILIES:
        assert f"{family.title} ({family.pipelines[0]})" in message
    assert families.detect("FluxPipeline", ["FluxTransformer2DModel", None]) is None
    with pytest.raises(ModelError, match="unknown model family 'flux'.*dit, sd, sdxl, sd3"):
        families.get("flux")
