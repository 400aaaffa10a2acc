"""The converter registry: one converter per pipeline component, one vocabulary, configs that round-trip."""

from __future__ import annotations

import pytest

from unclip_jax import stages
from unclip_jax.convert import io, registry
from unclip_jax.models import clip, decoder, prior, upsampler

# A test-variant network of every converter that has a config of its own.
MODULES = {
    "text_encoder": lambda: clip.build_text("test"),
    "image_encoder": lambda: clip.build_vision("test"),
    "clip": lambda: clip.build("test"),
    "prior": lambda: prior.build("test"),
    "decoder": lambda: decoder.Decoder(**decoder.build("test").unet_kwargs()),
    "text_proj": lambda: decoder.UnCLIPTextProj(**decoder.build("test").text_proj_kwargs()),
    "super_res_first": lambda: upsampler.build("test"),
    "super_res_last": lambda: upsampler.build("test"),
    "upsampler_1024": lambda: upsampler.build("test"),
}


def test_every_pipeline_component_has_a_converter_for_its_network():
    for c in stages.COMPONENTS:
        conv = registry.for_component(c.name)
        assert stages.resolve(c.modules[0]) in conv.module_types, c.name
    assert registry.for_component("decoder").name == "unclip_decoder"  # decoder/ + text_proj/
    assert registry.for_component("super_res_last").name == "super_res_last"
    assert set(MODULES) | {"unclip_decoder"} == set(registry.CONVERTERS)
    with pytest.raises(io.ConversionError, match="no converter 'nope'"):
        registry.converter("nope")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_config_round_trip(name):
    conv = registry.converter(name)
    module = MODULES[name]()
    assert isinstance(module, conv.module_types)
    config = conv.config_to_torch(module)
    assert config.get("_class_name", (config.get("architectures") or [None])[0]) == conv.torch_class
    again = conv.config_from_torch(config, f"{name}/config.json")
    assert conv.config_to_torch(again) == config
    assert conv.rules(module), name
