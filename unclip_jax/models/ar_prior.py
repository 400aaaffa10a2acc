"""The unCLIP autoregressive prior: a causal transformer over PCA codes of the CLIP image embedding.

Paper: Ramesh et al. 2022, section 2.2 ("Autoregressive (AR) prior") and appendix C. The
image embedding z_i is turned into k discrete codes by :mod:`unclip_jax.models.pca_codec`
(PCA to k components ordered by decreasing eigenvalue, each quantised into V buckets);
the transformer predicts them one by one, conditioned on a prefix.

Token sequence (B = batch, L = caption tokens, k = codes, n = L + k + 1 positions)::

    position  0 .. L-1      encoded caption: CLIP caption hidden states, projected to the width
    position  L             CLIP text embedding z_t, projected to one token
    position  L+1           the quantised dot product z_i . z_t (its own vocabulary of Vd tokens)
    position  L+2 .. L+k    codes 0 .. k-2 (shared code table [V, W])

Every position has its own learned positional embedding; the mask is causal intersected
with the caption padding mask. The output at position L predicts the dot-product token
(``dot_head``, Vd logits) and the output at position L+1+j predicts code j (``code_head``,
V logits), so one forward pass gives the teacher-forced logits of all k + 1 targets.

Context: the paper's "latent decoder context 384" holds z_t, the dot token and the 319
codes (321 <= 384); its 256-token caption comes from a separate text encoder (table 3:
ctx 256, width 2048). Here the caption is the CLIP text tower's hidden states (as for
the diffusion prior), projected and prepended, so the ``paper`` variant's sequence is
256 + 319 + 1 = 576 positions.

Classifier-free guidance (section 2.2: text conditioning dropped 10% of the time): with
``learned_null_text`` the caption hidden states, their mask and z_t are replaced by learned
null inputs (``null_text_hidden_states``, all-True mask, ``null_text_embeds``) where
``drop_text`` is True, both in training and for the unconditional branch at sampling.

The fitted codec lives in the non-trainable ``stats`` collection (:data:`CODEC_COLLECTION`;
fitted-on-data arrays, like the diffusion prior's normalisation statistics), created as
zeros by ``init`` and filled with :func:`codec_variables`, so checkpoints and native
exports carry it.

Sampling (:func:`sample`) is one compiled ``lax.scan`` of n steps with a key/value cache
(the ``decode`` mode of :class:`unclip_jax.layers.attention.MultiHeadAttention`, one
position per step; the caption prefix is fed through the same steps). The dot-product
token is drawn from the top half of its predicted distribution (see :func:`top_half`);
code tokens use classifier-free guidance, temperature, top-k and top-p.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.layers import axes
from unclip_jax.layers.attention import combine_masks, make_causal_mask, make_padding_mask
from unclip_jax.layers.transformer import Transformer, dense, layer_norm
from unclip_jax.models import pca_codec

Dtype = Any
CODEC_COLLECTION = "stats"  # variable collection of the fitted codec (pca_codec.STATE_KEYS)

VARIANTS: dict[str, dict[str, Any]] = {
    # Compiles and runs in seconds on CPU; pairs with clip.VARIANTS["test"] (projection 32, text width 32),
    # the embed folder of the train tests.
    "test": dict(
        embedding_dim=32,
        text_hidden_dim=32,
        num_text_tokens=77,
        num_components=8,
        num_buckets=16,
        num_dot_buckets=8,
        width=64,
        num_layers=2,
        num_heads=4,
    ),
    # The CPU demo's AR prior: pairs with the demo CLIP (experiments/clip.py:tiny: projection and text width 64)
    # like prior.VARIANTS["tiny"]. 16 components: the demo's z_i need 11 for the paper's criterion (PCA
    # reconstruction error < 1% of the variance, pca_codec.num_components_for), 15 for 0.5%.
    "tiny": dict(
        embedding_dim=64,
        text_hidden_dim=64,
        num_text_tokens=77,
        num_components=16,
        num_buckets=256,
        num_dot_buckets=64,
        width=128,
        num_layers=4,
        num_heads=4,
    ),
    # Paper latent decoder (1664 / 24 blocks / 26 heads) on OpenAI ViT-L/14 embeddings (768, Karlo's CLIP).
    # num_components is a placeholder of the paper's ratio (319/1024 * 768 = 240): re-choose it with
    # pca_codec.num_components_for on the training embeddings.
    "karlo": dict(
        embedding_dim=768,
        text_hidden_dim=768,
        num_text_tokens=77,
        num_components=240,
        num_buckets=1024,
        num_dot_buckets=1024,
        width=1664,
        num_layers=24,
        num_heads=26,
    ),
    # Appendix C / table 3: width 1664, 24 blocks, 26 heads, 319 of 1024 PCA components, 1024 buckets; the
    # caption is the paper CLIP text tower's 77 states (ViT-H/16 CLIP: 1024-dim embeddings, text width 1024).
    "paper": dict(
        embedding_dim=1024,
        text_hidden_dim=1024,
        num_text_tokens=77,
        num_components=319,
        num_buckets=1024,
        num_dot_buckets=1024,
        width=1664,
        num_layers=24,
        num_heads=26,
    ),
}


class ARPrior(nn.Module):
    """Causal transformer predicting the dot-product token and the k PCA codes of z_i.

    Attributes:
      embedding_dim: D, CLIP embedding width (z_i and z_t).
      text_hidden_dim: width of the caption hidden states (default D).
      num_text_tokens: L, caption length.
      num_components: k, PCA components = code tokens.
      num_buckets: V, buckets per component (code vocabulary).
      num_dot_buckets: Vd, dot-product vocabulary.
      width, num_layers, num_heads: transformer shape; head_dim defaults to width // num_heads.
      mlp_ratio: MLP hidden width / width.
      dropout: dropout inside the blocks.
      learned_null_text: learned unconditional caption inputs (classifier-free guidance).
      decode: key/value-cached single-position steps (:meth:`step`); set by :func:`sample`.
      remat: rematerialise the blocks.
      dtype, param_dtype: compute and parameter dtypes.
    """

    embedding_dim: int = 768
    text_hidden_dim: int | None = None
    num_text_tokens: int = 77
    num_components: int = 319
    num_buckets: int = 1024
    num_dot_buckets: int = 1024
    width: int = 1664
    num_layers: int = 24
    num_heads: int = 26
    head_dim: int | None = None
    mlp_ratio: int = 4
    dropout: float = 0.0
    learned_null_text: bool = True
    decode: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def seq_len(self) -> int:
        """n = L + 1 (z_t) + 1 (dot) + k - 1 (all codes but the last) positions."""
        return self.num_text_tokens + self.num_components + 1

    @property
    def hidden_dim(self) -> int:
        return self.text_hidden_dim or self.embedding_dim

    def setup(self) -> None:
        if self.width % self.num_heads and self.head_dim is None:
            raise ValueError(f"ARPrior.width={self.width} is not divisible by num_heads={self.num_heads}")
        w, dt, pdt = self.width, self.dtype, self.param_dtype
        self.caption_proj = dense(w, None, axes.EMBED, dt, pdt, "caption_proj")
        self.text_embed_proj = dense(w, None, axes.EMBED, dt, pdt, "text_embed_proj")
        emb_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED))
        self.dot_embed = nn.Embed(self.num_dot_buckets, w, dtype=dt, param_dtype=pdt, embedding_init=emb_init)
        self.code_embed = nn.Embed(self.num_buckets, w, dtype=dt, param_dtype=pdt, embedding_init=emb_init)
        self.positional_embedding = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.POSITION, axes.EMBED)),
            (self.seq_len, w),
            pdt,
        )
        if self.learned_null_text:
            self.null_text_hidden_states = self.param(
                "null_text_hidden_states",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.POSITION, axes.EMBED)),
                (1, self.num_text_tokens, self.hidden_dim),
                pdt,
            )
            self.null_text_embeds = self.param(
                "null_text_embeds",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, axes.EMBED)),
                (1, self.embedding_dim),
                pdt,
            )
        self.transformer = Transformer(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.head_dim or w // self.num_heads,
            mlp_dim=self.mlp_ratio * w,
            act="gelu",
            dropout_rate=self.dropout,
            decode=self.decode,
            remat=self.remat,
            dtype=dt,
            param_dtype=pdt,
        )
        self.norm_out = layer_norm(1e-5, dt, pdt, "norm_out")
        self.dot_head = dense(self.num_dot_buckets, axes.EMBED, axes.VOCAB, dt, pdt, "dot_head")
        self.code_head = dense(self.num_buckets, axes.EMBED, axes.VOCAB, dt, pdt, "code_head")
        if self.is_initializing():
            shapes = pca_codec.shapes(self.embedding_dim, self.num_components, self.num_buckets, self.num_dot_buckets)
            for name, shape in shapes.items():
                self.variable(CODEC_COLLECTION, name, jnp.zeros, shape, jnp.float32)

    # ------------------------------------------------------------------ codec

    def codec_state(self) -> dict[str, jax.Array]:
        """The fitted codec of the ``stats`` collection (see :mod:`unclip_jax.models.pca_codec`)."""
        if not self.has_variable(CODEC_COLLECTION, "mean"):
            raise ValueError(
                "ARPrior: variables lack the codec ('stats' collection); apply with {'params': ..., 'stats': ...} "
                "(ar_prior.codec_variables(pca_codec.fit(...)) or the variables of a checkpoint)"
            )
        return {k: self.get_variable(CODEC_COLLECTION, k) for k in pca_codec.STATE_KEYS}

    def encode_targets(self, image_embeds: jax.Array, text_embeds: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z_i, z_t [B, D] -> (dot token [B] int32, codes [B, k] int32)."""
        state = self.codec_state()
        z = image_embeds.astype(jnp.float32)
        return pca_codec.encode_dot(state, z, text_embeds.astype(jnp.float32)), pca_codec.encode(state, z)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Codes [B, k] -> image embeddings [B, D] (float32)."""
        return pca_codec.decode(self.codec_state(), codes)

    # ------------------------------------------------------------------ pieces

    def prefix(
        self,
        text_hidden_states: jax.Array,
        text_mask: jax.Array | None,
        text_embeds: jax.Array,
        drop_text: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Caption tokens and the z_t token.

        Args:
          text_hidden_states: [B, L, Dt] CLIP caption hidden states.
          text_mask: [B, L] bool (True = real token) or None (all real).
          text_embeds: [B, D] CLIP text embedding z_t.
          drop_text: optional [B] bool; True uses the learned null inputs.

        Returns:
          (x [B, L + 1, W], key_mask [B, n] bool over all n positions).
        """
        b, length = text_hidden_states.shape[:2]
        if length != self.num_text_tokens:
            raise ValueError(
                f"ARPrior: text_hidden_states has {length} tokens, expected num_text_tokens={self.num_text_tokens}"
            )
        mask = jnp.ones((b, length), bool) if text_mask is None else text_mask.astype(bool)
        if drop_text is not None:
            if not self.learned_null_text:
                raise ValueError("ARPrior: drop_text needs learned_null_text=True (the learned null caption inputs)")
            d = drop_text.astype(bool)
            text_hidden_states = jnp.where(
                d[:, None, None], self.null_text_hidden_states.astype(text_hidden_states.dtype), text_hidden_states
            )
            text_embeds = jnp.where(d[:, None], self.null_text_embeds.astype(text_embeds.dtype), text_embeds)
            mask = jnp.where(d[:, None], True, mask)
        cap = self.caption_proj(text_hidden_states.astype(self.dtype))
        zt = self.text_embed_proj(text_embeds.astype(self.dtype))[:, None]
        x = jnp.concatenate([cap, zt], axis=1)
        key_mask = jnp.concatenate([mask, jnp.ones((b, self.seq_len - length), bool)], axis=1)
        return x, key_mask

    def token_inputs(self, dot_tokens: jax.Array, codes: jax.Array) -> jax.Array:
        """Embeddings of [dot token, codes 0..m-1]: ([B], [B, m]) -> [B, 1 + m, W]."""
        return jnp.concatenate([self.dot_embed(dot_tokens)[:, None], self.code_embed(codes)], axis=1)

    def embed_token(self, tokens: jax.Array, is_dot: jax.Array) -> jax.Array:
        """[B] int -> [B, W]: the dot-token embedding where ``is_dot`` (scalar bool) else the code embedding."""
        dot = self.dot_embed(jnp.clip(tokens, 0, self.num_dot_buckets - 1))
        code = self.code_embed(jnp.clip(tokens, 0, self.num_buckets - 1))
        return jnp.where(is_dot, dot, code)

    def heads(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised hidden states [..., W] -> (dot logits [..., Vd], code logits [..., V]) in float32."""
        return self.dot_head(h).astype(jnp.float32), self.code_head(h).astype(jnp.float32)

    def encode_sequence(self, x: jax.Array, key_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Full (teacher-forced) pass: x [B, n', W] (n' <= n), key_mask [B, >= n'] -> [B, n', W] after norm_out."""
        n = x.shape[1]
        x = x + self.positional_embedding[:n].astype(self.dtype)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        mask = combine_masks(make_causal_mask(n), make_padding_mask(key_mask[:, :n]))
        return self.norm_out(self.transformer(x, mask, deterministic))

    def step(self, x: jax.Array, index: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One cached position (``decode=True``): x [B, 1, W] at position ``index`` -> logits of that position.

        Args:
          x: [B, 1, W] input embedding of position ``index``.
          index: scalar int, the position (equals the cache index).
          key_mask: [B, n] bool padding mask of all positions.

        Returns:
          (dot logits [B, Vd], code logits [B, V]) float32.
        """
        pos = jax.lax.dynamic_slice_in_dim(self.positional_embedding, index, 1, axis=0)
        x = x + pos[None].astype(self.dtype)
        h = self.norm_out(self.transformer(x, make_padding_mask(key_mask), True))
        return self.heads(h[:, 0])

    def __call__(
        self,
        text_hidden_states: jax.Array,
        text_mask: jax.Array | None,
        text_embeds: jax.Array,
        dot_tokens: jax.Array,
        codes: jax.Array,
        drop_text: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced logits of the dot token and all codes.

        Args:
          text_hidden_states: [B, L, Dt]; text_mask: [B, L] bool or None; text_embeds: [B, D].
          dot_tokens: [B] int, quantised z_i . z_t.
          codes: [B, k] int, the codes of z_i.
          drop_text: optional [B] bool (classifier-free guidance dropout).
          deterministic: disables dropout.

        Returns:
          (dot logits [B, Vd], code logits [B, k, V]), float32.
        """
        pre, key_mask = self.prefix(text_hidden_states, text_mask, text_embeds, drop_text)
        x = jnp.concatenate([pre, self.token_inputs(dot_tokens, codes[:, :-1]).astype(pre.dtype)], axis=1)
        h = self.encode_sequence(x, key_mask, deterministic)
        length = self.num_text_tokens
        dot_logits, _ = self.heads(h[:, length])
        _, code_logits = self.heads(h[:, length + 1 :])
        return dot_logits, code_logits


def build(variant: str, **overrides: Any) -> ARPrior:
    """Builds an :class:`ARPrior` from :data:`VARIANTS` with keyword overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"ar_prior variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return ARPrior(**{**VARIANTS[variant], **overrides})


def example_inputs(module: ARPrior, batch_size: int = 1) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes for ``init`` / ``jax.eval_shape``."""
    b = batch_size
    return dict(
        text_hidden_states=jnp.zeros((b, module.num_text_tokens, module.hidden_dim), jnp.float32),
        text_mask=jnp.ones((b, module.num_text_tokens), bool),
        text_embeds=jnp.zeros((b, module.embedding_dim), jnp.float32),
        dot_tokens=jnp.zeros((b,), jnp.int32),
        codes=jnp.zeros((b, module.num_components), jnp.int32),
        drop_text=jnp.zeros((b,), bool) if module.learned_null_text else None,
    )


def codec_variables(state: pca_codec.State) -> dict[str, jax.Array]:
    """A fitted codec state as the model's codec collection ``stats`` (float32): ``variables["stats"] = ...``."""
    pca_codec.check(state)
    return pca_codec.to_jax(state, jnp.float32)


# ---------------------------------------------------------------------- sampling


def top_half(logits: jax.Array) -> jax.Array:
    """Restricts a distribution over ordered buckets to its upper half (paper section 2.2).

    With p = softmax(logits) over buckets ordered by increasing value and the median bucket
    m = min{j : sum_{i <= j} p_i >= 1/2}, buckets below m get probability 0 and the rest is
    renormalised: the dot-product token is drawn from buckets at or above the median of the
    predicted distribution (at least half of the mass is kept).

    Args:
      logits: [..., V].

    Returns:
      [..., V] logits with the lower buckets set to -inf.
    """
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    median = jnp.sum(cdf < 0.5, axis=-1, keepdims=True)
    return jnp.where(jnp.arange(logits.shape[-1]) >= median, logits, -jnp.inf)


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Temperature, then top-k (keep the k largest; 0 = off), then top-p / nucleus (keep the smallest
    set of most likely tokens whose mass reaches p; 1 = off; Holtzman et al. 2019). [..., V] -> [..., V]."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass strictly before a token < p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _guide(logits: jax.Array, batch: int, guidance_scale: float | None) -> jax.Array:
    """Classifier-free guidance on the logits of a [2B] (cond; uncond) batch: u + s (c - u) of the log-probs."""
    if guidance_scale is None:
        return logits
    logp = jax.nn.log_softmax(logits, axis=-1)
    cond, uncond = logp[:batch], logp[batch:]
    return uncond + guidance_scale * (cond - uncond)


def sample(
    module: ARPrior,
    variables: dict[str, Any],
    text_hidden_states: jax.Array,
    text_mask: jax.Array | None,
    text_embeds: jax.Array,
    rng: jax.Array,
    *,
    guidance_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    dot_top_half: bool = True,
    use_cache: bool = True,
) -> dict[str, jax.Array]:
    """Samples the dot token and the k codes of z_i, then decodes them with the codec (jit-able).

    Step t of the scan (t = 0 .. n-1) feeds position t -- a caption token, z_t, the dot token
    or code t-L-2 -- and, from t = L on, draws token t-L from the logits of position t with the
    key ``fold_in(rng, t)``. ``use_cache=False`` re-runs the full sequence at every step
    instead (the reference the cached sampler must match token for token).

    Args:
      module, variables: the model and its variables (``params`` and ``stats``, the codec).
      text_hidden_states: [B, L, Dt]; text_mask: [B, L] bool or None; text_embeds: [B, D].
      rng: PRNG key.
      guidance_scale: classifier-free guidance scale on the log-probs (None = no guidance;
        needs ``learned_null_text``); applied to the dot and the code tokens.
      temperature, top_k, top_p: code-token filters (:func:`filter_logits`).
      dot_top_half: draw the dot token from the top half of its distribution (:func:`top_half`).
      use_cache: KV-cached single-position steps (True) or full re-runs (False).

    Returns:
      dict(dot_tokens [B] int32, codes [B, k] int32, image_embeds [B, D] float32,
      dot [B] float32 = the cosine the dot token stands for).
    """
    b = text_embeds.shape[0]
    length, k, n = module.num_text_tokens, module.num_components, module.seq_len
    params = {"params": variables["params"]}
    if guidance_scale is not None:
        if not module.learned_null_text:
            raise ValueError("ar_prior.sample: guidance_scale needs a model with learned_null_text=True")
        rep = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
        text_hidden_states, text_mask, text_embeds = rep(text_hidden_states), rep(text_mask), rep(text_embeds)
        drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    else:
        drop = None
    prefix, key_mask = module.apply(params, text_hidden_states, text_mask, text_embeds, drop, method=ARPrior.prefix)
    rows = prefix.shape[0]

    def choose(t, dot_logits, code_logits, tokens):
        key = jax.random.fold_in(rng, t)
        dot_logits = _guide(dot_logits, b, guidance_scale)
        code_logits = _guide(code_logits, b, guidance_scale)
        if dot_top_half:
            dot_logits = top_half(dot_logits)
        code_logits = filter_logits(code_logits, temperature, top_k, top_p)
        new = jnp.where(
            t == length,
            jax.random.categorical(key, dot_logits, axis=-1),
            jax.random.categorical(key, code_logits, axis=-1),
        ).astype(jnp.int32)
        j = jnp.clip(t - length, 0, k)
        return jnp.where(t >= length, tokens.at[:, j].set(new), tokens)

    def rep_tokens(tokens):
        return tokens if guidance_scale is None else jnp.concatenate([tokens, tokens], axis=0)

    tokens0 = jnp.zeros((b, k + 1), jnp.int32)  # [dot, code 0 .. k-1]
    if use_cache:
        dec = module.clone(decode=True, remat=False, dropout=0.0)
        full = jnp.zeros((rows, n, module.width), prefix.dtype)
        abstract = jax.eval_shape(
            lambda: dec.apply(params, full, key_mask, method=ARPrior.encode_sequence, mutable=["cache"])[1]
        )
        cache0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["cache"])

        def body(carry, t):
            cache, tokens = carry
            prev = rep_tokens(tokens)
            j = jnp.clip(t - length - 1, 0, k)
            tok = jax.lax.dynamic_slice_in_dim(prev, j, 1, axis=1)  # [rows, 1]
            emb = dec.apply(params, tok[:, 0], t == length + 1, method=ARPrior.embed_token)[:, None]
            emb_pre = jax.lax.dynamic_slice_in_dim(prefix, jnp.minimum(t, length), 1, axis=1)
            x = jnp.where(t <= length, emb_pre, emb.astype(prefix.dtype))
            (dot_logits, code_logits), upd = dec.apply(
                {**params, "cache": cache}, x, t, key_mask, method=ARPrior.step, mutable=["cache"]
            )
            return (upd["cache"], choose(t, dot_logits, code_logits, tokens)), None

        (_, tokens), _ = jax.lax.scan(body, (cache0, tokens0), jnp.arange(n))
    else:

        def body(tokens, t):
            prev = rep_tokens(tokens)
            emb = module.apply(params, prev[:, 0], prev[:, 1:k], method=ARPrior.token_inputs)
            x = jnp.concatenate([prefix, emb.astype(prefix.dtype)], axis=1)
            h = module.apply(params, x, key_mask, method=ARPrior.encode_sequence)
            h_t = jax.lax.dynamic_slice_in_dim(h, t, 1, axis=1)[:, 0]
            dot_logits, code_logits = module.apply(params, h_t, method=ARPrior.heads)
            return choose(t, dot_logits, code_logits, tokens), None

        tokens, _ = jax.lax.scan(body, tokens0, jnp.arange(length, n))
    dot_tokens, codes = tokens[:, 0], tokens[:, 1:]
    state = {key: variables[CODEC_COLLECTION][key] for key in pca_codec.STATE_KEYS}
    return dict(
        dot_tokens=dot_tokens,
        codes=codes,
        image_embeds=pca_codec.decode(state, codes),
        dot=pca_codec.decode_dot(state, dot_tokens),
    )


def num_params(module: ARPrior) -> int:
    """Parameter count from the abstract init (no allocation)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **example_inputs(module)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"]))))
