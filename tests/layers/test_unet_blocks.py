"""U-Net blocks (layers/unet_blocks.py): closed forms and parity with diffusers' ResnetBlock2D / AttnAddedKV attention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert.mapping import torch_to_flax
from unclip_jax.convert.unet import unet_rules
from unclip_jax.layers import unet_blocks as ub


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _import(module, torch_module, *example) -> dict:
    """Our params from a torch module's state dict (same rules as the weight bridge)."""
    abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *example)))["params"]
    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    return torch_to_flax(state, unet_rules(abstract), expected={"params": abstract}, where="torch module")


def _perturb(torch, m):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_upsample_downsample_closed_form():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    up = ub.upsample_nearest(x)
    assert up.shape == (2, 8, 12, 3)
    np.testing.assert_array_equal(up[:, ::2, ::2], x)
    np.testing.assert_array_equal(up[:, 1::2, 1::2], x)
    np.testing.assert_array_equal(up[:, 1::2, ::2], x)
    # Average pooling undoes nearest upsampling exactly.
    np.testing.assert_array_equal(ub.downsample_avg(up), x)
    manual = (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4
    np.testing.assert_allclose(ub.downsample_avg(x), manual, rtol=1e-6)
    with pytest.raises(ValueError, match="not even"):
        ub.downsample_avg(x[:, :3])


@pytest.mark.torch
@pytest.mark.parametrize(
    "norm,cin,cout,up,down",
    [("scale_shift", 16, 32, False, False), ("default", 16, 16, False, True), ("scale_shift", 32, 16, True, False)],
)
def test_resblock_matches_diffusers(torch_threads, norm, cin, cout, up, down):
    torch = torch_threads
    from diffusers.models.resnet import ResnetBlock2D

    ref = _perturb(
        torch,
        ResnetBlock2D(
            in_channels=cin,
            out_channels=cout,
            temb_channels=24,
            groups=8,
            eps=1e-5,
            time_embedding_norm=norm,
            up=up,
            down=down,
        ),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 6, cin)).astype(np.float32)
    temb = rng.standard_normal((2, 24)).astype(np.float32)
    block = ub.ResBlock(out_channels=cout, time_embedding_norm=norm, groups=8, up=up, down=down)
    params = _import(block, ref, x, temb)
    out = np.asarray(jax.jit(block.apply)(params, x, temb))
    with torch.no_grad():
        want = ref(torch.from_numpy(_nchw(x)), torch.from_numpy(temb)).numpy()
    diff = np.abs(_nchw(out) - want).max()
    assert out.shape[1:3] == ((16, 12) if up else (4, 3) if down else (8, 6))
    assert diff <= 1e-5, diff


@pytest.mark.torch
@pytest.mark.parametrize("processor", ["AttnAddedKVProcessor", "AttnAddedKVProcessor2_0"])
def test_added_kv_attention_matches_diffusers(torch_threads, processor):
    torch = torch_threads
    from diffusers.models import attention_processor as ap

    c, hd, dc, s = 32, 8, 20, 7
    ref = _perturb(
        torch,
        ap.Attention(
            query_dim=c,
            cross_attention_dim=c,
            heads=c // hd,
            dim_head=hd,
            added_kv_proj_dim=dc,
            norm_num_groups=8,
            bias=True,
            upcast_softmax=True,
            processor=getattr(ap, processor)(),
        ),
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 6, c)).astype(np.float32)
    ctx = rng.standard_normal((3, s, dc)).astype(np.float32)
    mask = np.ones((3, s), bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    attn = ub.AddedKVAttention(head_dim=hd, groups=8)
    params = _import(attn, ref, x, ctx, mask)
    out = np.asarray(jax.jit(attn.apply)(params, x, ctx, mask))
    bias = torch.from_numpy((1.0 - mask.astype(np.float32)) * -10000.0)[:, None, :]
    with torch.no_grad():
        want = ref(torch.from_numpy(_nchw(x)), encoder_hidden_states=torch.from_numpy(ctx), attention_mask=bias)
    diff = np.abs(_nchw(out) - want.numpy()).max()
    assert diff <= 1e-5, diff
    # The mask matters: without it the output changes.
    unmasked = np.asarray(jax.jit(attn.apply)(params, x, ctx, None))
    assert np.abs(unmasked - out)[0].max() > 1e-3


def test_remat_gives_same_loss_and_grads():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, 12)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 3, 12)), jnp.float32)
    kw = dict(out_channels=8, attention=True, head_dim=4, groups=4)
    block = ub.MidBlock(**kw)
    # Random values everywhere (no init compile; the zero-initialised output layers must not hide anything).
    shapes, tree = jax.tree.flatten(nn.unbox(jax.eval_shape(lambda: block.init(jax.random.key(0), x, temb, ctx))))
    rng = np.random.default_rng(3)
    params = jax.tree.unflatten(tree, [jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32) for a in shapes])

    def loss_and_grad(m):
        return jax.jit(jax.value_and_grad(lambda p: (m.apply(p, x, temb, ctx) ** 2).mean()))(params)

    l0, g0 = loss_and_grad(block)
    l1, g1 = loss_and_grad(ub.MidBlock(**kw, remat=True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_attention_custom_vjp_equals_autodiff():
    """The attention core's hand-written backward (probabilities only) == JAX autodiff of the same forward,
    with masked context keys (they must get exactly zero gradient)."""
    rng = np.random.default_rng(0)
    b, lq, lk, h, d = 2, 12, 16, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, h, n, d)), jnp.float32) for n in (lq, lk, lk))
    keep = jnp.ones((b, lk)).at[0, :3].set(0.0).at[1, 5].set(0.0)  # some context tokens padded
    g = jnp.asarray(rng.normal(size=(b, h, lq, d)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, keep) * g)

    ours = jax.grad(loss(ub._added_kv_attend_bh), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda *a: ub._attend_bh_fwd_impl(*a)[0]), argnums=(0, 1, 2))(q, k, v)
    for name, a, r in zip("qkv", ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
    np.testing.assert_array_equal(np.asarray(ours[1])[0, :, :3], 0.0)  # masked keys get no gradient
    np.testing.assert_array_equal(np.asarray(ours[2])[1, :, 5], 0.0)
    np.testing.assert_allclose(
        np.asarray(ub._added_kv_attend_bh(q, k, v, keep)), np.asarray(ub._attend_bh_fwd_impl(q, k, v, keep)[0])
    )


def test_unknown_attention_layout_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        with ub.attention_layout("qkv"):
            pass
