"""Config validation in one place: every field with a domain is checked before anything is built.

:func:`validate_config` walks the experiment's config itself (so a field added to
:func:`unclip_jax.train.defaults.base_config` is covered by the rule its name matches) and raises one
:class:`ConfigError` naming each out-of-domain field, its value and its domain. :data:`FIELD_RULES` holds the domain
of each field by its dotted name, :data:`NAME_RULES` the domains that follow from a name alone (``*_prob`` is a
probability, ``*_steps`` a count); ``tests/train/test_faults.py`` checks that every numeric field of every stage's
config has one.

:func:`resume_changes` compares a resumed run's config with the one its checkpoint recorded: the fields of
:data:`RESUMABLE` (length of the run, learning-rate schedule, intervals, mesh, data reading) may change; any other
difference is an error listing them, unless named in ``--allow_config_change``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config field outside its domain, or a resume with a config that may not differ (one line)."""


Rule = tuple[str, Callable[[Any], bool]]  # (domain in words, predicate)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


POS_INT: Rule = ("an integer >= 1", lambda v: isinstance(v, int) and v >= 1)
NONNEG_INT: Rule = ("an integer >= 0", lambda v: isinstance(v, int) and v >= 0)
POS: Rule = ("a number > 0", lambda v: _num(v) and v > 0)
NONNEG: Rule = ("a number >= 0", lambda v: _num(v) and v >= 0)
PROB: Rule = ("a probability in [0, 1]", lambda v: _num(v) and 0 <= v <= 1)
BETA: Rule = ("a number in [0, 1)", lambda v: _num(v) and 0 <= v < 1)
MESH_AXIS: Rule = (
    "-1 (all remaining devices) or an integer >= 1",
    lambda v: isinstance(v, int) and (v == -1 or v >= 1),
)
ANY: Rule = ("any value", lambda v: True)
PATH: Rule = ("'' or an existing path", lambda v: v in ("", None) or os.path.exists(os.path.expanduser(str(v))))
DTYPE: Rule = ("one of 'float32', 'bfloat16', 'float16'", lambda v: v in ("float32", "bfloat16", "float16"))


def _choice(options: Iterable[str]) -> Rule:
    options = tuple(options)
    return (f"one of {options}", lambda v: v in options)


def _field_rules() -> dict[str, Rule]:
    from unclip_jax.train.optim import SCHEDULES

    return {
        "seed": ANY,
        "total_steps": POS_INT,
        "batch_size": POS_INT,
        "log_every": POS_INT,
        "preview_every": NONNEG_INT,  # 0: no previews
        "preview_count": POS_INT,
        "task.stats": PATH,
        "task.null_caption": PATH,
        "model.dtype": DTYPE,
        "model.param_dtype": DTYPE,
        "task.temperature": POS,
        "task.top_k": ("an integer >= 0 (0: off)", lambda v: isinstance(v, int) and v >= 0),
        "task.top_p": ("a number in (0, 1]", lambda v: _num(v) and 0 < v <= 1),
        "task.guidance_scale": NONNEG,
        "diffusion.steps": POS_INT,
        "diffusion.sample_steps": ANY,  # a respacing spec ('unclip25', 'ddim5', '250'): parsed where it is used
        "diffusion.clip_denoised": NONNEG,  # 0: off
        "diffusion.vlb_weight": NONNEG,
        "diffusion.snr_gamma": ("None (off) or a number > 0", lambda v: v is None or (_num(v) and v > 0)),
        "optim.lr": NONNEG,  # 0 freezes the params (a run that only moves the EMA or the data position)
        "optim.b1": BETA,
        "optim.b2": BETA,
        "optim.eps": POS,
        "optim.weight_decay": NONNEG,
        "optim.schedule": _choice(SCHEDULES),
        "optim.end_lr_factor": PROB,
        "optim.grad_clip_norm": NONNEG,  # 0: off
        "optim.grad_accum_steps": POS_INT,
        "ema.decay": PROB,
        "mesh.data": MESH_AXIS,
        "mesh.fsdp": MESH_AXIS,
        "mesh.tensor": MESH_AXIS,
        "distributed.num_processes": NONNEG_INT,
        "distributed.process_id": ("-1 (unset) or an integer >= 0", lambda v: isinstance(v, int) and v >= -1),
        "data.folder": PATH,
        "data.crop_fraction": PROB,
        "data.low_res_factor": POS_INT,
        "data.read_threads": NONNEG_INT,
        "data.read_buffer": NONNEG_INT,
        "data.prefetch_batches": NONNEG_INT,
        "data.worker_count": NONNEG_INT,
        "init_from": PATH,
        "checkpoint.every": POS_INT,
        "checkpoint.keep": ("an integer >= 0 (0 keeps all)", lambda v: isinstance(v, int) and v >= 0),
    }


# Domains that follow from a field's name (first match), for fields FIELD_RULES does not name.
NAME_RULES: tuple[tuple[str, Rule], ...] = (
    ("*_prob", PROB),
    ("*_size", POS_INT),
    ("*_steps", NONNEG_INT),
    ("*_step", ("-1 (off) or an integer >= 0", lambda v: isinstance(v, int) and v >= -1)),
    ("*_examples", NONNEG_INT),
    ("*_every", NONNEG_INT),
    ("*_count", NONNEG_INT),
    ("*.lr", NONNEG),
)

# Free-form fields: names and strings checked where they are used (the registry, the model builder, the mesh presets).
UNCHECKED = ("task.name", "model.variant", "model.overrides.*", "mesh.rules", "mesh.rules_override", "distributed.*")

# Fields a resumed run may change: they do not shape the state or the order of the data.
RESUMABLE = (
    "total_steps",
    "log_every",
    "preview_every",
    "preview_count",
    "optim.lr",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.decay_steps",
    "optim.end_lr_factor",
    "checkpoint.*",
    "export.*",
    "profile.*",
    "compilation_cache_dir",
    "mesh.*",
    "distributed.*",
    "data.folder",
    "data.read_threads",
    "data.read_buffer",
    "data.prefetch_batches",
    "data.worker_count",
    "init_from",
    "model.remat",
    "diffusion.sample_steps",
)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-4, ...}`` of a nested dict (ConfigDict.to_dict())."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            sub = flatten(v, f"{prefix}{k}.")
            out.update(sub if sub else {f"{prefix}{k}": {}})
        else:
            out[f"{prefix}{k}"] = v
    return out


def rule_of(field: str) -> Rule | None:
    """The domain of a dotted field name (``None``: unchecked)."""
    rules = _field_rules()
    if field in rules:
        return rules[field]
    if any(fnmatch.fnmatchcase(field, p) for p in UNCHECKED):
        return None
    for pattern, rule in NAME_RULES:
        if fnmatch.fnmatchcase(field, pattern):
            return rule
    return None


def problems(config: Any) -> list[str]:
    """Every out-of-domain field of ``config`` (a ConfigDict or dict) as ``config.<field>=<value>: expected ...``."""
    flat = flatten(config.to_dict() if hasattr(config, "to_dict") else config)
    out = []
    for field, value in flat.items():
        rule = rule_of(field)
        if rule is not None and not rule[1](value):
            out.append(f"config.{field}={value!r}: expected {rule[0]}")
    total = flat.get("total_steps")
    warmup = flat.get("optim.warmup_steps")
    if isinstance(total, int) and isinstance(warmup, int) and total >= 1 and warmup > total:
        out.append(f"config.optim.warmup_steps={warmup}: expected <= config.total_steps={total}")
    batch, accum = flat.get("batch_size"), flat.get("optim.grad_accum_steps")
    if isinstance(batch, int) and isinstance(accum, int) and batch >= 1 and accum >= 1 and batch % accum:
        out.append(f"config.optim.grad_accum_steps={accum}: expected a divisor of config.batch_size={batch}")
    count = flat.get("preview_count")
    if flat.get("preview_every") and isinstance(count, int) and isinstance(batch, int) and count > batch:
        out.append(f"config.preview_count={count}: expected <= config.batch_size={batch}")
    return out


def validate_config(config: Any) -> None:
    """Raises :class:`ConfigError` naming every field out of its domain (before anything is built)."""
    found = problems(config)
    if found:
        raise ConfigError("; ".join(found))


def _norm(d: Mapping[str, Any]) -> dict[str, Any]:
    return flatten(json.loads(json.dumps(dict(d), default=str)))


def _allowed(field: str, patterns: Iterable[str]) -> bool:
    return any(field == p or fnmatch.fnmatchcase(field, p) or field.startswith(p + ".") for p in patterns)


def resume_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], allow: Iterable[str] = (), where: str = ""
) -> list[str]:
    """The fields in which ``current`` differs from the checkpoint's ``saved`` config, as ``field old -> new``.

    Raises:
      ConfigError: a differing field outside :data:`RESUMABLE` and ``allow`` (listing each, and what to do).
    """
    old, new = _norm(saved), _norm(current)
    diffs = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    allow = tuple(allow)
    bad = [k for k in diffs if not _allowed(k, RESUMABLE + allow)]
    show = [f"{k} {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in diffs]
    if bad:
        listed = ", ".join(
            f"{k} (checkpoint {old.get(k, '<absent>')!r}, now {new.get(k, '<absent>')!r})" for k in bad[:8]
        )
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ConfigError(
            f"resuming {where or 'the checkpoint'} with a config that differs in {listed}{more}: keep the "
            f"checkpoint's values (drop those --config overrides), start a new --workdir, or, if the change is "
            f"meant, pass --allow_config_change={','.join(bad)} (may fail if it changes the state's shapes)"
        )
    return show
