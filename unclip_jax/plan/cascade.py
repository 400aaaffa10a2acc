"""The sampling cascade on one TPU chip, for serving: memory and seconds per image at the paper's step counts.

``unclip plan --cascade=paper --topology=v5p:2x2x1`` builds the cascade of the experiments' ``<variant>`` models —
CLIP text tower, prior, decoder, 64->256 and 256->1024 upsamplers of ``experiments/<stage>.py:<variant>``, abstractly
(``jax.eval_shape`` of each task's init; nothing is allocated) in the serving dtype — and compiles the pipeline's own
program (:data:`unclip_jax.pipeline.program.CASCADE`, ``mode="generate"``, two prior candidates as in section 2.2) for
one chip of the slice with libtpu:

- **memory**: the compiled program's argument (all components' weights) + temporary bytes against the chip's HBM;
- **seconds per image**: XLA's cost model counts a sampling loop's body once, so the program is compiled with one
  step per stage and stopped after each stage in turn; the difference of consecutive prefixes is one step of that
  stage (its network at the classifier-free-guidance batch). Each stage's step cost x its step count (each stage
  experiment's ``diffusion.sample_steps``: the paper's 64 / 250 / 27 / 15, table 3) gives a roofline time (max of
  FLOPs over the chip's bf16 peak and bytes over its HBM bandwidth) and a time at a stated model-FLOPs utilisation.

These are compile-time estimates, not measured runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.chips import Chip
from unclip_jax.diffusion import diffusion_from_config
from unclip_jax.pipeline.plan import make_plan
from unclip_jax.pipeline.program import CASCADE
from unclip_jax.pipeline.settings import STAGES, StageSettings, resolve_settings, traced_values
from unclip_jax.plan.topology import PlanError, compile_within_hbm, topology_devices
from unclip_jax.plan.train_step import (
    DEFAULT_MFU,
    HEADROOM,
    host_peak_gib,
    layout,
    memory_report,
    roofline,
    xla_cost,
)

# Cascade component -> the experiment file whose ``<variant>`` trains it. The CLIP task's network is the two-tower
# CLIP, which the cascade accepts as its text encoder (only the text tower runs; the vision tower's weights are
# counted in the memory, as a deployment that keeps the CLIP whole would hold them).
EXPERIMENTS: dict[str, str] = {
    "text_encoder": "experiments/clip.py",
    "prior": "experiments/prior.py",
    "decoder": "experiments/decoder.py",
    "super_res_first": "experiments/upsampler.py",
    "upsampler_1024": "experiments/upsampler_1024.py",
}
# The sampling stage each component's step counts come from.
STAGE_OF = {"prior": "prior", "decoder": "decoder", "super_res_first": "super_res", "upsampler_1024": "upsampler_1024"}


@dataclasses.dataclass(frozen=True)
class Component:
    """One component of the planned cascade: its experiment config, network, abstract variables and diffusion."""

    config: Any
    module: Any
    variables: Any
    diffusion: Any


def _serving_overrides(dtype: str) -> dict[str, Any]:
    # One chip, one example, no training-time memory savers: what the forward of the network needs.
    return {
        "mesh.data": 1,
        "mesh.fsdp": 1,
        "mesh.tensor": 1,
        "batch_size": 1,
        "optim.grad_accum_steps": 1,
        "model.remat": False,
        "model.dtype": dtype,
        "model.param_dtype": dtype,
    }


def load_components(
    variant: str,
    topology: str,
    device: Any,
    chip: Chip,
    dtype: str = "bfloat16",
    names: Sequence[str] = tuple(EXPERIMENTS),
) -> dict[str, Component]:
    """The cascade's components of ``experiments/<stage>.py:<variant>``, abstract, placed on ``device``.

    Raises:
      PlanError: a component's experiment has no such variant.
    """
    from unclip_jax.train.config_loading import load_experiment

    out = {}
    sharding = jax.sharding.SingleDeviceSharding(device)
    for name in names:
        spec = f"{EXPERIMENTS[name]}:{variant}"
        try:
            config = load_experiment(spec, _serving_overrides(dtype))
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise PlanError(f"--cascade={variant}: {spec} cannot be loaded ({str(e).splitlines()[0]})") from e
        lay = layout(config, topology, [device], chip)
        abstract = {"params": lay.abstract.params, **lay.abstract.extra}
        variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
        diffusion = None
        if lay.task.diffusion_config is not None:
            diffusion = diffusion_from_config(lay.task.diffusion_config, f"{spec} config.diffusion")
        out[name] = Component(lay.config, lay.task.module, variables, diffusion)
    return out


def paper_settings(components: Mapping[str, Component], steps: int | None = None) -> dict[str, StageSettings]:
    """Each stage sampled as its experiment previews it (``diffusion.sample_steps``: "unclip64", "250", "ddim27",
    "ddim15" at ``paper``), the registry's guidance scales; ``steps`` replaces every count (1: one step per stage)."""
    overrides = {}
    for name, stage in STAGE_OF.items():
        if name not in components:
            continue
        spec = str(components[name].config.diffusion.sample_steps)
        sampler = "ddim" if spec.startswith("ddim") else "ddpm"
        if steps is not None:
            spec = str(steps)
        overrides[stage] = dataclasses.replace(resolve_settings()[stage], steps=spec, sampler=sampler)
    return resolve_settings(overrides)


def step_counts(settings: Mapping[str, StageSettings], components: Mapping[str, Component]) -> dict[str, int]:
    """Sampling steps per stage (the respaced diffusion's length)."""
    from unclip_jax.diffusion import respace

    return {
        stage: int(respace(components[name].diffusion, settings[stage].spacing).num_timesteps)
        for name, stage in STAGE_OF.items()
        if name in components
    }


def _abstract_inputs(components: Mapping[str, Component], batch: int, device: Any, settings) -> tuple[Any, ...]:
    sharding = jax.sharding.SingleDeviceSharding(device)
    length = int(components["text_encoder"].module.text["context_length"])

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    inputs = dict(
        input_ids=spec((batch, length), jnp.int32),
        mask=spec((batch, length), jnp.bool_),
        null_ids=spec((1, length), jnp.int32),
        null_mask=spec((1, length), jnp.bool_),
    )
    scales = {k: spec(np.shape(v), v.dtype) for k, v in traced_values(settings).items()}
    return inputs, scales, spec((2,), jnp.uint32)


def compile_cascade(
    components: Mapping[str, Component],
    settings: Mapping[str, StageSettings],
    stop_after: str,
    batch: int,
    device: Any,
    num_candidates: int = 2,
) -> Any:
    """The pipeline's ``generate`` program up to ``stop_after``, compiled for ``device`` (a TPU topology device)."""
    modules = {name: c.module for name, c in components.items()}
    diffusions = {stage: components[name].diffusion for name, stage in STAGE_OF.items() if name in components}
    plan, names = make_plan(
        modules, diffusions, "generate", settings, num_candidates=num_candidates, stop_after=stop_after
    )
    variables = {n: components[n].variables for n in names}
    inputs, scales, key = _abstract_inputs(components, batch, device, settings)
    return compile_within_hbm(
        lambda: CASCADE.lower(plan, variables, inputs, scales, key).compile(),
        f"the cascade at batch {batch} on one {device.device_kind}",
    )


def plan_cascade(
    variant: str,
    topology: str,
    *,
    batch: int = 1,
    dtype: str = "bfloat16",
    mfu: float = DEFAULT_MFU,
    stop_after: str = "upsampler_1024",
    num_candidates: int = 2,
    devices: list[Any] | None = None,
    chip: Chip | None = None,
) -> dict[str, Any]:
    """Memory and seconds per image of the ``variant`` cascade on one chip of ``topology`` (a JSON-able dict).

    Raises:
      PlanError: bad topology, missing libtpu, a variant some stage's experiment lacks.
    """
    if batch < 1:
        raise PlanError(f"--batch={batch}: must be >= 1")
    if stop_after not in STAGES:
        raise PlanError(f"--stop_after={stop_after!r}: expected one of {STAGES}")
    if devices is None or chip is None:
        chip, devices = topology_devices(topology)
    device = devices[0]
    run = STAGES[: STAGES.index(stop_after) + 1]
    names = ["text_encoder", *(n for n, s in STAGE_OF.items() if s in run)]
    t0 = time.perf_counter()
    components = load_components(variant, topology, device, chip, dtype, names)
    settings = paper_settings(components)
    counts = step_counts(settings, components)
    one_step = paper_settings(components, steps=1)

    # Prefix programs with one step per stage: the difference of consecutive ones is one step of a stage.
    stages_out: dict[str, Any] = {}
    previous = {"flops": 0.0, "bytes accessed": 0.0}
    memory = None
    for stage in run:
        compiled = compile_cascade(components, one_step, stage, batch, device, num_candidates)
        cost = xla_cost(compiled)
        flops = max(float(cost.get("flops", 0.0)) - previous["flops"], 0.0)
        nbytes = max(float(cost.get("bytes accessed", 0.0)) - previous["bytes accessed"], 0.0)
        previous = {"flops": float(cost.get("flops", 0.0)), "bytes accessed": float(cost.get("bytes accessed", 0.0))}
        roof = roofline(flops, nbytes, chip)
        n = counts[stage]
        step_at_mfu = max(flops / (chip.bf16_tflops * 1e12 * mfu), roof["step_s"]) if flops else 0.0
        stages_out[stage] = {
            "steps": n,
            "spacing": settings[stage].spacing,
            "sampler": settings[stage].sampler,
            "flops_per_step": flops,
            "bytes_per_step": nbytes,
            "roofline_s": n * roof["step_s"],
            "s_at_mfu": n * step_at_mfu,
        }
        memory = memory_report(compiled)  # the last prefix is the whole program
    memory = memory or {}
    params = {
        name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(c.variables["params"])))
        for name, c in components.items()
    }
    total_roof = sum(s["roofline_s"] for s in stages_out.values())
    total_mfu = sum(s["s_at_mfu"] for s in stages_out.values())
    return {
        "kind": "cascade",
        "variant": variant,
        "topology": topology,
        "chip": chip.name,
        "device_kind": getattr(device, "device_kind", ""),
        "hbm_gib": chip.hbm_gib,
        "batch": batch,
        "dtype": dtype,
        "num_candidates": num_candidates,
        "stop_after": stop_after,
        "params": params,
        "memory": memory,
        "fits": memory.get("used", 0) <= (1.0 - HEADROOM) * chip.hbm_bytes,
        "headroom": 1.0 - memory.get("used", 0) / chip.hbm_bytes,
        "stages": stages_out,
        "mfu": mfu,
        "s_per_image_roofline": total_roof / batch,
        "s_per_image_at_mfu": total_mfu / batch,
        "compile_s": time.perf_counter() - t0,
        "host_peak_gib": host_peak_gib(),
    }


__all__ = ["EXPERIMENTS", "compile_cascade", "load_components", "paper_settings", "plan_cascade", "step_counts"]
