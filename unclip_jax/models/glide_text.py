"""GLIDE's caption transformer, trained jointly with the decoder (paper section 2.1 and appendix C; GLIDE section 3).

The paper's 64x64 decoder is GLIDE's 3.5B model (Nichol et al. 2021) whose caption encoder is a transformer trained
with the U-Net (table 3: context 256, width 2048, 24 blocks, 32 heads). This module follows ``openai/glide-text2im``
(``text2im_model.py:Text2ImUNet.get_text_emb`` and ``xf.py``):

- ``xf_in = token_embedding(tokens) + positional_embedding``; with ``xf_padding`` the padded positions get a learned
  ``padding_embedding`` instead (``where(mask, xf_in, padding_embedding)``), so the empty caption (every position
  padding) has its own learned states;
- a bidirectional pre-LN transformer (``xf.py:Transformer``: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``, MLP
  ``4 * width`` with exact GELU, no attention mask), then ``final_ln`` when ``xf_final_ln``;
- ``xf_proj = transformer_proj(xf_out[:, -1])``: the **last position**'s state projected to the U-Net's timestep
  embedding width (added to it), and ``xf_out`` [B, L, width]: the token states every attention layer projects into
  its extra keys/values (GLIDE ``encoder_kv``; here each :class:`~unclip_jax.layers.unet_blocks.AddedKVAttention`'s
  ``add_k_proj`` / ``add_v_proj``).

GLIDE's fused ``c_qkv`` projection is three separate q/k/v Dense layers here (:class:`unclip_jax.layers.transformer.
TransformerBlock`): the same parameter count and, with the kernels split per head, the same function (the test
transcribes ``xf.py`` in torch and checks it). Tokens are our CLIP tokenizer's (vocabulary 49408; GLIDE's own BPE has
50257): the decoder reads the caption ids its input pipeline already holds. Captions shorter than ``text_ctx`` use the
first ``L`` positions.

The empty caption of classifier-free guidance is GLIDE's ``padded_tokens_and_mask([], text_ctx)``: token 0
everywhere and no real token (:func:`empty_caption`), used by the decoder task's caption dropout and by the
sampler's unconditional branch alike.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.layers import axes
from unclip_jax.layers.transformer import Transformer, dense, layer_norm

Dtype = Any

CLIP_VOCAB_SIZE = 49408  # the tokens the decoder's input pipeline holds (unclip_jax.input.tokenizer)


def empty_caption(batch: int, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """GLIDE's empty caption (``tokenizer.padded_tokens_and_mask([], text_ctx)``): ids [B, L] all 0, mask all False."""
    return jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), bool)


class GlideTextEncoder(nn.Module):
    """The caption transformer of GLIDE's ``Text2ImUNet`` (see module docstring).

    Parameters: ``token_embedding`` (embedding [vocab, width]), ``positional_embedding`` [text_ctx, width],
    ``padding_embedding`` [text_ctx, width] (with ``xf_padding``), ``transformer/layers_{i}``, ``final_ln`` (with
    ``xf_final_ln``), ``transformer_proj`` (width -> time_embed_dim).

    Attributes:
      text_ctx: positions (GLIDE ``text_ctx``; the paper 256).
      xf_width, xf_layers, xf_heads: transformer width, depth and heads (paper 2048 / 24 / 32).
      xf_final_ln: LayerNorm after the last block.
      xf_padding: learned embedding on the padded positions.
      vocab_size: token vocabulary.
      time_embed_dim: width of the U-Net's timestep embedding (``transformer_proj`` output).
      remat: rematerialise each block in the backward pass.
    """

    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    vocab_size: int = CLIP_VOCAB_SIZE
    time_embed_dim: int = 2048
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Encodes caption tokens.

        Args:
          input_ids: [B, L] int token ids, L <= ``text_ctx``.
          mask: [B, L] bool, True on real tokens (needed with ``xf_padding``; None = all real).

        Returns:
          ``xf_proj`` [B, time_embed_dim] (added to the timestep embedding) and ``xf_out`` [B, L, xf_width].
        """
        b, length = input_ids.shape
        if length > self.text_ctx:
            raise ValueError(f"GlideTextEncoder: {length} caption tokens exceed text_ctx={self.text_ctx}")
        if self.xf_width % self.xf_heads:
            raise ValueError(
                f"GlideTextEncoder: xf_width={self.xf_width} is not a multiple of xf_heads={self.xf_heads}"
            )
        w = self.xf_width
        tok = nn.Embed(
            self.vocab_size,
            w,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
            name="token_embedding",
        )
        pos = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (axes.POSITION, axes.EMBED)),
            (self.text_ctx, w),
            self.param_dtype,
        )
        xf_in = tok(input_ids.astype(jnp.int32)) + pos[None, :length].astype(self.dtype)
        if self.xf_padding:
            pad = self.param(
                "padding_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.01), (axes.POSITION, axes.EMBED)),
                (self.text_ctx, w),
                self.param_dtype,
            )
            if mask is None:
                mask = jnp.ones((b, length), bool)
            xf_in = jnp.where(mask.astype(bool)[..., None], xf_in, pad[None, :length].astype(self.dtype))
        xf_in = nn.with_logical_constraint(xf_in.astype(self.dtype), (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        xf_out = Transformer(
            num_layers=self.xf_layers,
            num_heads=self.xf_heads,
            head_dim=w // self.xf_heads,
            mlp_dim=4 * w,
            act="gelu",
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer",
        )(xf_in)
        if self.xf_final_ln:
            xf_out = layer_norm(1e-5, self.dtype, self.param_dtype, "final_ln")(xf_out)
        xf_proj = dense(self.time_embed_dim, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, "transformer_proj")(
            xf_out[:, -1]
        )
        return xf_proj, xf_out


def num_params(module: GlideTextEncoder) -> int:
    """Parameter count of a :class:`GlideTextEncoder` in closed form (GLIDE ``xf.py`` layer by layer)."""
    w, n = module.xf_width, module.xf_layers
    block = (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w) + 2 * 2 * w
    total = (
        module.vocab_size * w + module.text_ctx * w + n * block + (w * module.time_embed_dim + module.time_embed_dim)
    )
    total += module.text_ctx * w if module.xf_padding else 0
    total += 2 * w if module.xf_final_ln else 0
    return total
