"""The unCLIP diffusion prior: a causal transformer that predicts the CLIP image embedding.

Paper: Ramesh et al. 2022, section 2.2 ("Diffusion prior") and appendix C. Numerics and
parameter layout: diffusers ``PriorTransformer`` (Karlo weights), so that Karlo's
``prior`` folder imports and exports bit for bit (``unclip_jax/convert/prior.py``).

The token sequence is ``[caption hidden states (L) | text embedding z_t | timestep
embedding | noised image embedding z_i^(t) | learned "prd" query]`` with learned
positions, a causal mask intersected with the caption padding mask, and the prediction
(x0 of the normalised image embedding) read from the final token.

Normalisation: the prior works on ``(z_i - clip_mean) / clip_std``; the statistics live
in the ``stats`` variable collection (not ``params``, so optimisers never touch them)
and are applied with :meth:`PriorTransformer.normalize` / :meth:`~PriorTransformer.denormalize`
(diffusers ``post_process_latents``).

Classifier-free guidance (section 2.2: text conditioning dropped 10% of the time): the
diffusers ``UnCLIPPipeline`` -- and hence Karlo -- uses the CLIP text encoding of the
empty caption ``""`` (hidden states, text embedding and its 2-token mask) as the
unconditional input. Models trained from scratch may instead set ``learned_null_text``,
which adds ``null_text_embedding`` and ``null_encoder_hidden_states`` parameters used
where ``drop_text`` is True (such params have no diffusers equivalent and are not exported).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.layers import axes
from unclip_jax.layers.attention import combine_masks, make_causal_mask, make_padding_mask
from unclip_jax.layers.embeddings import TimestepEmbedding, timestep_embedding
from unclip_jax.layers.transformer import Transformer, dense, layer_norm

Dtype = Any

VARIANTS: dict[str, dict[str, Any]] = {
    # Compiles and runs in seconds on CPU; pairs with clip.VARIANTS["test"] (projection 32, text width 32).
    "test": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32, num_embeddings=77),
    # The CPU demo (unclip_jax.demo, experiments/prior.py:tiny): width 64, 3 blocks; pairs with the demo CLIP
    # (experiments/clip.py:tiny: projection and text width 64).
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=3, embedding_dim=64, num_embeddings=77),
    # Benchmark size; pairs with clip.VARIANTS["tiny"] (projection and text width 256).
    "bench": dict(num_attention_heads=8, attention_head_dim=64, num_layers=6, embedding_dim=256, num_embeddings=77),
    # kakaobrain/karlo-v1-alpha prior (diffusers config), ~1B parameters.
    "karlo": dict(
        num_attention_heads=32,
        attention_head_dim=64,
        num_layers=20,
        embedding_dim=768,
        num_embeddings=77,
        additional_embeddings=4,
    ),
    # Appendix C: width 2048, 24 blocks, 1024-dim CLIP embeddings (ViT-H/16); the encoded caption is the paper
    # CLIP text tower's 77 states (clip.VARIANTS["paper"]), the sequence the cascade hands the prior.
    "paper": dict(num_attention_heads=32, attention_head_dim=64, num_layers=24, embedding_dim=1024, num_embeddings=77),
}


class PriorTransformer(nn.Module):
    """Diffusion prior transformer (diffusers ``PriorTransformer`` numerics).

    Attributes (names and meaning of the diffusers config):
      num_attention_heads, attention_head_dim: width = heads * head_dim.
      num_layers: transformer blocks.
      embedding_dim: CLIP embedding size of ``hidden_states`` (z_i) and, unless
        overridden, of ``proj_embedding`` and the caption hidden states.
      num_embeddings: caption length L.
      additional_embeddings: tokens after the caption (z_t, time, z_i, prd) = 4.
      dropout: dropout rate inside the blocks.
      time_embed_act_fn: activation of the timestep MLP ("silu").
      norm_in_type: None or "layer" (LayerNorm before the blocks).
      embedding_proj_norm_type: None or "layer" (LayerNorm on ``proj_embedding``).
      time_embed_dim: hidden width of the timestep MLP (default: width).
      embedding_proj_dim: size of ``proj_embedding`` (default: embedding_dim).
      clip_embed_dim: output size (default: embedding_dim).
      encoder_hid_dim: size of caption hidden states (default: embedding_dim; diffusers
        ties it to embedding_dim, so only that value exports).
      learned_null_text: learned unconditional caption inputs (see module docstring).
      remat: rematerialise the blocks.
    """

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None
    encoder_hid_dim: int | None = None
    learned_null_text: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.clip_embed_dim or self.embedding_dim

    def validate(self) -> None:
        """Raises a ValueError naming a field whose value this prior does not support."""
        if self.additional_embeddings != 4:
            raise ValueError(
                f"PriorTransformer.additional_embeddings={self.additional_embeddings}: the sequence "
                "[caption, z_t, time, z_i, prd] has exactly 4 tokens after the caption"
            )
        for field in ("norm_in_type", "embedding_proj_norm_type"):
            if getattr(self, field) not in (None, "layer"):
                raise ValueError(f"PriorTransformer.{field}={getattr(self, field)!r}: expected None or 'layer'")

    def _stats(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        if not self.has_variable("stats", "clip_mean"):
            raise ValueError(
                "PriorTransformer: variables lack the 'stats' collection (clip_mean, clip_std); "
                "apply with the full variables of init / load_prior, e.g. {'params': ..., 'stats': ...}"
            )
        return self.get_variable("stats", "clip_mean"), self.get_variable("stats", "clip_std")

    def normalize(self, z: jnp.ndarray) -> jnp.ndarray:
        """``(z - clip_mean) / clip_std``: CLIP image embedding [B, D] -> prior space [B, D]."""
        mean, std = self._stats()
        return (z - mean) / std

    def denormalize(self, z: jnp.ndarray) -> jnp.ndarray:
        """``z * clip_std + clip_mean`` (diffusers ``post_process_latents``): [B, D] -> [B, D]."""
        mean, std = self._stats()
        return z * std + mean

    def null_inputs(self, batch_size: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Learned unconditional inputs (requires ``learned_null_text``).

        Returns:
          (proj_embedding [B, Dp], encoder_hidden_states [B, L, Dt], attention_mask [B, L] all True).
        """
        if not self.learned_null_text:
            raise ValueError(
                "PriorTransformer.learned_null_text is False: use the CLIP encoding of the empty caption "
                "'' as the unconditional input (diffusers UnCLIPPipeline / Karlo convention)"
            )
        dp = self.embedding_proj_dim or self.embedding_dim
        dt = self.encoder_hid_dim or self.embedding_dim
        null_emb = nn.unbox(self.get_variable("params", "null_text_embedding"))
        null_hid = nn.unbox(self.get_variable("params", "null_encoder_hidden_states"))
        return (
            jnp.broadcast_to(null_emb, (batch_size, dp)),
            jnp.broadcast_to(null_hid, (batch_size, self.num_embeddings, dt)),
            jnp.ones((batch_size, self.num_embeddings), bool),
        )

    @nn.compact
    def __call__(
        self,
        hidden_states: jnp.ndarray,
        timestep: jnp.ndarray,
        proj_embedding: jnp.ndarray,
        encoder_hidden_states: jnp.ndarray,
        attention_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
        drop_text: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Predicts the (normalised) clean image embedding.

        Args:
          hidden_states: [B, D] noised normalised image embedding z_i^(t).
          timestep: [B] (or scalar) diffusion step.
          proj_embedding: [B, Dp] CLIP text embedding z_t.
          encoder_hidden_states: [B, L, Dt] CLIP caption hidden states (L = num_embeddings).
          attention_mask: [B, L] bool caption mask (True = real token); None = all real.
            (diffusers drops the causal mask too when this is None; here it is always causal.)
          deterministic: disables dropout.
          drop_text: optional [B] bool; True replaces the caption inputs by the learned null
            inputs (classifier-free guidance training/sampling; needs ``learned_null_text``).

        Returns:
          [B, clip_embed_dim] predicted image embedding (x0, normalised space).
        """
        self.validate()
        if self.is_initializing():
            self.variable("stats", "clip_mean", lambda: jnp.zeros((1, self.out_dim), self.param_dtype))
            self.variable("stats", "clip_std", lambda: jnp.ones((1, self.out_dim), self.param_dtype))
        b = hidden_states.shape[0]
        width = self.inner_dim
        if encoder_hidden_states.shape[1] != self.num_embeddings:
            raise ValueError(
                f"PriorTransformer: encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, "
                f"expected num_embeddings={self.num_embeddings}"
            )
        if attention_mask is None:
            attention_mask = jnp.ones(encoder_hidden_states.shape[:2], bool)
        attention_mask = attention_mask.astype(bool)
        if self.learned_null_text:
            self.param(
                "null_text_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.EMBED)),
                (1, self.embedding_proj_dim or self.embedding_dim),
                self.param_dtype,
            )
            self.param(
                "null_encoder_hidden_states",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.POSITION, axes.EMBED)),
                (1, self.num_embeddings, self.encoder_hid_dim or self.embedding_dim),
                self.param_dtype,
            )
            if drop_text is not None:
                null_emb, null_hid, null_mask = self.null_inputs(b)
                drop = drop_text.astype(bool)
                proj_embedding = jnp.where(drop[:, None], null_emb.astype(proj_embedding.dtype), proj_embedding)
                encoder_hidden_states = jnp.where(
                    drop[:, None, None], null_hid.astype(encoder_hidden_states.dtype), encoder_hidden_states
                )
                attention_mask = jnp.where(drop[:, None], null_mask, attention_mask)
        elif drop_text is not None:
            self.null_inputs(b)  # raises the explanatory error

        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        t_feat = timestep_embedding(timestep, width, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        time_emb = TimestepEmbedding(
            self.time_embed_dim or width,
            width,
            self.time_embed_act_fn,
            self.dtype,
            self.param_dtype,
            name="time_embedding",
        )(t_feat.astype(self.dtype))

        if self.embedding_proj_norm_type == "layer":
            proj_embedding = layer_norm(1e-5, self.dtype, self.param_dtype, "embedding_proj_norm")(proj_embedding)
        proj_emb = dense(width, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, "embedding_proj")(proj_embedding)
        enc = dense(width, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, "encoder_hidden_states_proj")(
            encoder_hidden_states
        )
        z = dense(width, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, "proj_in")(hidden_states)

        n = self.num_embeddings + self.additional_embeddings
        positions = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.POSITION, axes.EMBED)),
            (1, n, width),
            self.param_dtype,
        )
        prd = self.param(
            "prd_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, axes.EMBED)),
            (1, 1, width),
            self.param_dtype,
        )
        x = jnp.concatenate(
            [
                enc.astype(self.dtype),
                proj_emb[:, None, :].astype(self.dtype),
                time_emb[:, None, :].astype(self.dtype),
                z[:, None, :].astype(self.dtype),
                jnp.broadcast_to(prd, (b, 1, width)).astype(self.dtype),
            ],
            axis=1,
        )
        x = x + positions.astype(self.dtype)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

        key_mask = jnp.concatenate([attention_mask, jnp.ones((b, self.additional_embeddings), bool)], axis=1)
        mask = combine_masks(make_causal_mask(n), make_padding_mask(key_mask))

        if self.norm_in_type == "layer":
            x = layer_norm(1e-5, self.dtype, self.param_dtype, "norm_in")(x)
        x = Transformer(
            num_layers=self.num_layers,
            num_heads=self.num_attention_heads,
            head_dim=self.attention_head_dim,
            mlp_dim=4 * width,
            act="gelu",
            dropout_rate=self.dropout,
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer",
        )(x, mask, deterministic)
        x = layer_norm(1e-5, self.dtype, self.param_dtype, "norm_out")(x[:, -1])
        return dense(self.out_dim, axes.MLP, axes.EMBED, self.dtype, self.param_dtype, "proj_to_clip_embeddings")(x)


def build(variant: str, **overrides: Any) -> PriorTransformer:
    """Builds a :class:`PriorTransformer` from :data:`VARIANTS` with keyword overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"prior variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return PriorTransformer(**{**VARIANTS[variant], **overrides})


def example_inputs(module: PriorTransformer, batch_size: int = 1) -> dict[str, jnp.ndarray]:
    """Zero inputs of the right shapes for ``init`` / ``jax.eval_shape``."""
    d = module.embedding_dim
    return dict(
        hidden_states=jnp.zeros((batch_size, d), jnp.float32),
        timestep=jnp.zeros((batch_size,), jnp.int32),
        proj_embedding=jnp.zeros((batch_size, module.embedding_proj_dim or d), jnp.float32),
        encoder_hidden_states=jnp.zeros((batch_size, module.num_embeddings, module.encoder_hid_dim or d), jnp.float32),
        attention_mask=jnp.ones((batch_size, module.num_embeddings), bool),
    )
