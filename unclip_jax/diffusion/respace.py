"""Respacing: sampling with a subset of the training timesteps (guided-diffusion ``respace.py``).

API (other modules code against these):
    * ``space_timesteps(num_timesteps, section_counts) -> tuple[int, ...]`` sorted ascending, unique. Accepts
        - ``"ddimN"``: the stride-k grid ``range(0, T, k)`` with exactly N steps (DDIM paper / guided-diffusion);
        - ``"N"`` or ``"10,10,5"``: guided-diffusion section counts (T split into equal sections, each strided
          evenly with its count, rounded);
        - ``"unclipN"``: diffusers ``UnCLIPScheduler.set_timesteps(N)``: ``round(arange(N) * (T-1)/(N-1))`` with
          numpy's round-half-even, i.e. N steps from T-1 down to 0 inclusive (Karlo);
        - a list / tuple / array of ints: those exact timesteps (NOT section counts as in guided-diffusion);
        - a callable ``f(num_timesteps) -> iterable of ints``.
    * ``respace(diffusion, timesteps) -> GaussianDiffusion`` whose betas are recomputed so that the kept
      ``alphas_cumprod`` are unchanged (``beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}``, the same as UnCLIPScheduler's
      "dynamically recomputed" beta for ``prev_timestep``) and whose ``timestep_map`` gives the original timestep of
      each index, so ``denoise_fn`` always sees original timesteps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from unclip_jax.diffusion.gaussian import GaussianDiffusion

SectionCounts = str | Sequence[int] | np.ndarray | Callable[[int], Iterable[int]]


def unclip_timesteps(num_timesteps: int, num_inference_steps: int) -> tuple[int, ...]:
    """The timesteps of diffusers' ``UnCLIPScheduler.set_timesteps`` (ascending here; it iterates descending).

    Args:
        num_timesteps: T of training.
        num_inference_steps: N >= 2.

    Returns:
        sorted tuple of N ints from 0 to T-1, ``round(i * (T-1)/(N-1))``.
    """
    if num_inference_steps < 2 or num_inference_steps > num_timesteps:
        raise ValueError(f"unclip spacing needs 2 <= steps <= {num_timesteps}, got {num_inference_steps}")
    step_ratio = (num_timesteps - 1) / (num_inference_steps - 1)
    steps = (np.arange(0, num_inference_steps) * step_ratio).round().astype(np.int64)
    return tuple(sorted({int(s) for s in steps}))


def _section_spacing(num_timesteps: int, section_counts: list[int]) -> set[int]:
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"space_timesteps: cannot take {section_count} steps from a section of {size} timesteps")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def space_timesteps(num_timesteps: int, section_counts: SectionCounts) -> tuple[int, ...]:
    """The timesteps to keep from a process of ``num_timesteps`` steps (see the module docstring for forms).

    Returns:
        sorted, unique tuple of ints in [0, num_timesteps).

    Raises:
        ValueError: malformed spec, counts larger than available, or timesteps out of range.
    """
    if callable(section_counts):
        steps = {int(s) for s in section_counts(num_timesteps)}
    elif isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = int(spec[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return tuple(range(0, num_timesteps, i))
            raise ValueError(
                f"space_timesteps: cannot create exactly {desired} steps with an integer stride from {num_timesteps}"
            )
        if spec.startswith("unclip"):
            return unclip_timesteps(num_timesteps, int(spec[len("unclip") :]))
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError as e:
            raise ValueError(
                f"space_timesteps: {section_counts!r} is not 'ddimN', 'unclipN' or comma-separated section counts"
            ) from e
        steps = _section_spacing(num_timesteps, counts)
    else:
        steps = {int(s) for s in np.asarray(section_counts).reshape(-1)}
    if not steps:
        raise ValueError(f"space_timesteps: {section_counts!r} selects no timesteps")
    bad = [s for s in steps if not 0 <= s < num_timesteps]
    if bad:
        raise ValueError(f"space_timesteps: timesteps {sorted(bad)} outside [0, {num_timesteps})")
    return tuple(sorted(steps))


def respace(diffusion: GaussianDiffusion, timesteps: SectionCounts) -> GaussianDiffusion:
    """A diffusion over a subset of ``diffusion``'s timesteps (guided-diffusion ``SpacedDiffusion``).

    Args:
        diffusion: the (usually un-respaced) training diffusion.
        timesteps: anything `space_timesteps` accepts, in ``diffusion``'s own index numbering.

    Returns:
        a `GaussianDiffusion` with the same settings, ``len(kept)`` betas and ``timestep_map`` composed with
        ``diffusion.timestep_map`` (so respacing a respaced diffusion still maps to original timesteps).
    """
    kept = space_timesteps(diffusion.num_timesteps, timesteps)
    abar = diffusion.alphas_cumprod[list(kept)]
    abar_prev = np.append(1.0, abar[:-1])
    new_betas = 1.0 - abar / abar_prev
    tmap = tuple(diffusion.timestep_map[i] for i in kept)
    return dataclasses.replace(diffusion, betas=new_betas, timestep_map=tmap)
