"""The op-by-op profile: on a tiny two convs + GroupNorm + attention train step (AdamW + EMA), every op lands in one
category, the categories sum to the total, and each known op lands where it belongs, ours and PyTorch's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax

from unclip_jax.bench import profile
from unclip_jax.layers.attention import dot_product_attention
from unclip_jax.train import optim, state


def _tiny_step():
    cfg = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=0,
            schedule="constant",
            decay_steps=0,
            end_lr_factor=0.0,
            grad_clip_norm=1.0,
        )
    )
    tx, _ = optim.make_optimizer(cfg, 10)
    params = {"w": jnp.full((3, 3, 8, 8), 0.01), "w2": jnp.full((3, 3, 8, 8), 0.02), "scale": jnp.ones((8,))}

    def loss(p, x):
        for w in (p["w"], p["w2"]):  # the second conv's input gradient is needed
            x = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jnp.tanh(x)
        with jax.named_scope("norm1"):
            g = y.reshape(2, 16, 16, 2, 4)
            mean = g.mean(axis=(1, 2, 4), keepdims=True)
            var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
            y = ((g - mean) * lax.rsqrt(var + 1e-5)).reshape(y.shape) * p["scale"]
        q = y.reshape(2, 256, 2, 4)
        return jnp.mean(dot_product_attention(q, q, q) ** 2)

    def step(s, x):
        p, opt_state, ema = s
        grads = jax.grad(loss)(p, x)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        return p, opt_state, state.ema_update(ema, p, 0.9)

    s = (params, tx.init(params), params)
    x = jnp.ones((2, 16, 16, 8))
    return jax.jit(step).lower(s, x).compile(), s, x


def test_jax_profile_categories_sum_to_total_and_conv_lands_in_conv():
    compiled, s, x = _tiny_step()
    instrs, comps = profile.parse_hlo(compiled.as_text())
    convs = [n for n, line in instrs.items() if " convolution(" in line]
    assert convs, "the tiny step has convolutions"
    # Every HLO convolution is a conv category; the forward, input-grad and weight-grad are told apart.
    tops = [n for n in instrs if profile.classify_hlo(n, instrs, comps) is not None]
    cats = {profile.classify_hlo(n, instrs, comps) for n in tops}
    assert {profile.CONV_FWD, profile.CONV_INPUT_GRAD, profile.CONV_WEIGHT_GRAD} <= cats
    assert {profile.ATTENTION, profile.OPTIMIZER, profile.NORM} <= cats

    holder = {"s": s}

    def run():
        holder["s"] = jax.block_until_ready(compiled(holder["s"], x))

    run()
    res = profile.jax_profile(compiled, run, steps=2)
    assert abs(sum(res["categories"].values()) - res["total"]) < 1e-9
    assert res["total"] > 0 and res["wall"] > 0
    for cat in (profile.CONV_FWD, profile.CONV_WEIGHT_GRAD, profile.OPTIMIZER, profile.ATTENTION):
        assert res["categories"][cat] > 0, cat
    # The time of every event of the step is in some category: the total is the events' sum.
    assert res["total"] >= sum(t["seconds"] for t in res["top"]) - 1e-12


def test_torch_profile_categories_sum_to_total_and_conv_lands_in_conv():
    import torch

    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    norm = torch.nn.GroupNorm(2, 8)
    params = list(conv.parameters()) + list(norm.parameters())
    opt = torch.optim.AdamW(params)
    x = torch.ones(2, 8, 16, 16)

    def step():
        opt.zero_grad()
        y = norm(conv(x))
        q = y.flatten(2).transpose(1, 2).reshape(2, 256, 2, 4).transpose(1, 2)
        loss = torch.nn.functional.scaled_dot_product_attention(q, q, q).square().mean()
        loss.backward()
        with torch.profiler.record_function(optim.OPTIMIZER_SCOPE):
            opt.step()

    step()
    res = profile.torch_profile(step, steps=2)
    assert abs(sum(res["categories"].values()) - res["total"]) < 1e-9
    for cat in (profile.CONV_FWD, profile.CONV_BACKWARD, profile.NORM, profile.ATTENTION, profile.OPTIMIZER):
        assert res["categories"][cat] > 0, cat
    assert profile.classify_torch(["autograd::engine::evaluate_function: ConvolutionBackward0", "aten::fill_"]) == (
        profile.CONV_BACKWARD
    )
    assert profile.classify_torch(["aten::add"]) == profile.ELEMENTWISE


def test_profile_table_rows():
    cats = dict.fromkeys(profile.CATEGORIES, 0.0)
    ours = {**cats, profile.CONV_FWD: 0.2, profile.CONV_WEIGHT_GRAD: 0.1}
    ref = {**cats, profile.CONV_FWD: 0.1, profile.CONV_BACKWARD: 0.1}
    res = {
        "jax": {"categories": ours, "total": 0.3, "wall": 0.3},
        "torch": {"categories": ref, "total": 0.2, "wall": 0.25},
    }
    md = "\n".join(profile.profile_table("t", res))
    assert "| conv forward | 200.0 | 100.0 | x2.00 |" in md
    assert "| (all conv backward) | 100.0 | 100.0 | x1.00 |" in md
    assert "| **total op time** | 300.0 | 200.0 | x1.50 |" in md
    assert "optimizer" not in md  # categories with no time on either side are left out
