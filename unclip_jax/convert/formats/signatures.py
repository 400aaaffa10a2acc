"""The serving signature of each network: named inputs with a symbolic batch, named outputs, a pure forward.

An export to another runtime (ONNX, TensorFlow SavedModel, serialized StableHLO) needs what the network's
``apply`` leaves implicit: which arrays go in, in which order, with which shapes and dtypes, and which come out.
Those are the networks' own inference entry points, with the names diffusers / transformers give them
(``UNet2DConditionModel.forward``, ``PriorTransformer.forward``, ``CLIPTextModelWithProjection``, ...), so that
an exported network reads like its PyTorch counterpart. The leading dimension of every input is the batch,
exported symbolically (:data:`BATCH`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BATCH = "batch"  # the symbolic leading dimension of every input and output


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named input or output: ``shape`` holds ints and :data:`BATCH` for the symbolic batch; integer inputs
    give their exclusive upper bound ``high`` (vocabulary size, diffusion steps)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    high: int | None = None

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return out if self.high is None else {**out, "high": self.high}


@dataclasses.dataclass(frozen=True)
class Signature:
    """A network's serving entry point.

    Attributes:
      inputs / outputs: named specs, in call / return order.
      fn: ``fn(variables, *inputs) -> tuple(outputs)``, pure and jittable.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fn: Callable[..., tuple[jax.Array, ...]]

    def example(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of batch ``batch`` (ids within the vocabulary, timesteps within 1000, masks with padding)."""
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.inputs:
            shape = spec.concrete(batch)
            if spec.dtype == "bool":
                a = np.ones(shape, bool)
                if a.ndim == 2 and a.shape[1] > 2:
                    a[:, rng.integers(2, a.shape[1]) :] = False  # some padding
            elif spec.dtype.startswith(("int", "uint")):
                a = rng.integers(0, spec.high or 2, shape).astype(spec.dtype)
            else:
                a = rng.standard_normal(shape).astype(spec.dtype)
            out[spec.name] = a
        return out


def _spec(name: str, shape: tuple[int | str, ...], dtype: str = "float32", high: int | None = None) -> TensorSpec:
    return TensorSpec(name, (BATCH, *shape), dtype, high)


TIMESTEPS = 1000  # the diffusion steps every network here is trained with


def _param_shape(
    variables: Mapping[str, Any] | None, path: tuple[str, ...], default: tuple[int, ...]
) -> tuple[int, ...]:
    """The shape of a parameter, or ``default`` before there are variables (an input width that only the
    trained weights fix, such as the caption states' width entering a projection)."""
    if variables is None:
        return default
    node: Any = nn.unbox(variables)["params"]
    for k in path:
        node = node[k]
    return tuple(np.shape(node))


def _prior(module: nn.Module, variables: Mapping[str, Any] | None) -> Signature:
    d = module.embedding_dim
    length, hid = module.num_embeddings, module.encoder_hid_dim or d

    def fn(v, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask):
        return (module.apply(v, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask),)

    return Signature(
        inputs=(
            _spec("hidden_states", (d,)),
            _spec("timestep", (), "int32", TIMESTEPS),
            _spec("proj_embedding", (module.embedding_proj_dim or d,)),
            _spec("encoder_hidden_states", (length, hid)),
            _spec("attention_mask", (length,), "bool"),
        ),
        outputs=(_spec("predicted_image_embedding", (module.clip_embed_dim or d,)),),
        fn=fn,
    )


def _tower(module: nn.Module, index: int) -> tuple[nn.Module, str | None]:
    """(tower, method): the text (0) / vision (1) tower of a two-tower CLIP and the CLIP method that runs it, or
    the module itself and no method."""
    if not hasattr(module, "tower_kwargs"):
        return module, None
    from unclip_jax.models.clip import CLIPTextModel, CLIPVisionModel

    kwargs = module.tower_kwargs()[index]
    return (CLIPTextModel, CLIPVisionModel)[index](**kwargs), ("encode_text", "encode_image")[index]


def _text_encoder(module: nn.Module, variables: Mapping[str, Any] | None) -> Signature:
    tower, method = _tower(module, 0)
    length, width = tower.context_length, tower.width

    def fn(v, input_ids, attention_mask):
        out = (
            module.apply(v, input_ids, attention_mask, method=method)
            if method
            else module.apply(v, input_ids, attention_mask)
        )
        return out["text_embeds"], out["last_hidden_state"]

    return Signature(
        inputs=(_spec("input_ids", (length,), "int32", tower.vocab_size), _spec("attention_mask", (length,), "bool")),
        outputs=(_spec("text_embeds", (tower.projection_dim,)), _spec("last_hidden_state", (length, width))),
        fn=fn,
    )


def _image_encoder(module: nn.Module, variables: Mapping[str, Any] | None) -> Signature:
    tower, method = _tower(module, 1)

    def fn(v, pixel_values):
        out = module.apply(v, pixel_values, method=method) if method else module.apply(v, pixel_values)
        return (out["image_embeds"],)

    return Signature(
        inputs=(_spec("pixel_values", (tower.image_size, tower.image_size, tower.num_channels)),),
        outputs=(_spec("image_embeds", (tower.projection_dim,)),),
        fn=fn,
    )


def _decoder(module: nn.Module, variables: Mapping[str, Any] | None) -> Signature:
    s, c = module.sample_size, module.in_channels
    hid = _param_shape(variables, ("text_proj", "encoder_hidden_states_proj", "kernel"), (module.clip_embeddings_dim,))[
        0
    ]
    length = 77

    def fn(v, sample, timestep, image_embeds, text_embeds, text_hidden_states, text_mask):
        return (module.apply(v, sample, timestep, image_embeds, text_embeds, text_hidden_states, text_mask),)

    return Signature(
        inputs=(
            _spec("sample", (s, s, c)),
            _spec("timestep", (), "int32", TIMESTEPS),
            _spec("image_embeds", (module.clip_embeddings_dim,)),
            _spec("text_embeds", (module.clip_embeddings_dim,)),
            _spec("text_hidden_states", (length, hid)),
            _spec("text_mask", (length,), "bool"),
        ),
        outputs=(_spec("model_output", (s, s, module.out_channels)),),
        fn=fn,
    )


def _super_res(module: nn.Module, variables: Mapping[str, Any] | None) -> Signature:
    s, c = module.sample_size, module.out_channels

    def fn(v, sample, timestep, low_res):
        return (module.apply(v, sample, timestep, low_res),)

    return Signature(
        inputs=(
            _spec("sample", (s, s, c)),
            _spec("timestep", (), "int32", TIMESTEPS),
            _spec("low_res_upsampled", (s, s, module.in_channels - c)),
        ),
        outputs=(_spec("model_output", (s, s, c)),),
        fn=fn,
    )


def _ar_prior(module: nn.Module, variables: Mapping[str, Any] | None) -> Signature:
    d, length = module.embedding_dim, module.num_text_tokens
    hid, k = module.text_hidden_dim or d, module.num_components

    def fn(v, text_hidden_states, text_mask, text_embeds, dot_tokens, codes):
        dot_logits, code_logits = module.apply(v, text_hidden_states, text_mask, text_embeds, dot_tokens, codes)
        return dot_logits, code_logits

    return Signature(
        inputs=(
            _spec("text_hidden_states", (length, hid)),
            _spec("text_mask", (length,), "bool"),
            _spec("text_embeds", (d,)),
            _spec("dot_tokens", (), "int32", module.num_dot_buckets),
            _spec("codes", (k,), "int32", module.num_buckets),
        ),
        outputs=(_spec("dot_logits", (module.num_dot_buckets,)), _spec("code_logits", (k, module.num_buckets))),
        fn=fn,
    )


# network class name -> (component the signature serves -> builder)
BUILDERS: dict[str, dict[str, Callable[[nn.Module, Mapping[str, Any] | None], Signature]]] = {
    "PriorTransformer": {"prior": _prior},
    "ARPrior": {"prior": _ar_prior},
    "CLIPTextModel": {"text_encoder": _text_encoder},
    "CLIPVisionModel": {"image_encoder": _image_encoder},
    "CLIP": {"text_encoder": _text_encoder, "image_encoder": _image_encoder},
    "UnCLIPDecoder": {"decoder": _decoder},
    "SuperResUNet": {"super_res": _super_res},
}


def signature_of(module: nn.Module, variables: Mapping[str, Any] | None, component: str | None = None) -> Signature:
    """The serving signature of ``module`` (for a two-tower CLIP, ``component`` picks the tower); ``variables``
    may be None before a network is initialised (input widths then take their usual values).

    Raises:
      ValueError: the network has no exportable signature (naming it and the choices).
    """
    name = type(module).__name__
    builders = BUILDERS.get(name)
    if builders is None:
        raise ValueError(f"{name}: no export signature; exportable networks are {sorted(BUILDERS)}")
    if component is None or component not in builders:
        if len(builders) > 1:
            raise ValueError(f"{name}: say which part to export, one of {sorted(builders)}")
        component = next(iter(builders))
    return builders[component](module, variables)


def concrete_inputs(signature: Signature, batch: int) -> list[jax.ShapeDtypeStruct]:
    """Abstract inputs of a fixed batch (for tracing)."""
    return [jax.ShapeDtypeStruct(s.concrete(batch), jnp.dtype(s.dtype)) for s in signature.inputs]


def symbolic_inputs(signature: Signature) -> list[jax.ShapeDtypeStruct]:
    """Abstract inputs whose batch is one symbolic dimension (``jax.export`` shape polymorphism)."""
    (b,) = jax.export.symbolic_shape(BATCH)
    return [
        jax.ShapeDtypeStruct(tuple(b if d == BATCH else d for d in s.shape), jnp.dtype(s.dtype))
        for s in signature.inputs
    ]
