"""Resumable stages: the run's context, done markers and the loop that skips finished stages.

Every stage writes ``WORKDIR/stages/<name>.json`` (its done marker: outputs, the commands that made them, seconds
taken) when it finishes; a re-run skips stages whose marker is present and whose outputs still exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unclip_jax.demo.profiles import Profile
from unclip_jax.evaluate.storage import json_default

MARKERS = "stages"


class Context:
    """The run's work directory, profile and progress printing."""

    def __init__(self, workdir: str | os.PathLike, profile: Profile, out: Callable[[str], None] | None = None):
        self.workdir = Path(workdir).resolve()
        self.profile = profile
        self.t0 = time.perf_counter()
        self._out = out or (lambda s: print(s, flush=True))
        self.commands: list[str] = []

    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    def log(self, msg: str) -> None:
        self._out(f"[demo {time.perf_counter() - self.t0:7.1f}s] {msg}")

    def command(self, cmd: str) -> None:
        """Records a command of the current stage (shown in the report)."""
        self.commands.append(cmd)
        self.log(f"$ {cmd}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resumable step: ``run(ctx) -> outputs`` (paths relative to the workdir, and numbers).

    ``settings(profile)`` names what of the profile the stage's result depends on beyond its step counts (e.g. the
    dataset's scene distribution); it is stored in the done marker, and resuming a workdir whose marker records
    other settings is an error rather than a silent mix of two runs.
    """

    name: str
    title: str
    run: Callable[[Context], dict[str, Any]]
    settings: Callable[[Profile], dict[str, Any]] | None = None


def marker_path(workdir: str | os.PathLike, name: str) -> Path:
    return Path(workdir) / MARKERS / f"{name}.json"


def read_marker(workdir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The done marker of stage ``name`` if it exists and every file it lists still exists."""
    p = marker_path(workdir, name)
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except ValueError:
        return None
    for rel in m.get("files", []):
        if not (Path(workdir) / rel).exists():
            return None
    return m


def write_marker(workdir: str | os.PathLike, name: str, marker: dict[str, Any]) -> Path:
    p = marker_path(workdir, name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=1, default=json_default))
    os.replace(tmp, p)
    return p


def run_stages(ctx: Context, stages: list[Stage]) -> dict[str, dict[str, Any]]:
    """Runs the stages in order, skipping finished ones; returns every stage's marker."""
    markers = {}
    for i, st in enumerate(stages, 1):
        done = read_marker(ctx.workdir, st.name)
        settings = st.settings(ctx.profile) if st.settings else {}
        if done is not None and done.get("settings", settings) != settings:
            raise ValueError(
                f"{marker_path(ctx.workdir, st.name)}: stage {st.name!r} was made with {done['settings']}, profile "
                f"{ctx.profile.name!r} asks for {settings}: use a new workdir (or delete the marker to redo the stage)"
            )
        if done is not None:
            ctx.log(f"[{i}/{len(stages)}] {st.title}: done before ({done['seconds']:.0f}s), skipping")
            markers[st.name] = done
            continue
        ctx.log(f"[{i}/{len(stages)}] {st.title} ...")
        ctx.commands = []
        t = time.perf_counter()
        outputs = st.run(ctx)
        seconds = time.perf_counter() - t
        marker = {
            "name": st.name,
            "title": st.title,
            "seconds": seconds,
            "budget_s": ctx.profile.budget_s.get(st.name),
            "commands": list(ctx.commands),
            "files": outputs.pop("files", []),
            "outputs": outputs,
            "settings": settings,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_marker(ctx.workdir, st.name, marker)
        markers[st.name] = marker
        ctx.log(f"[{i}/{len(stages)}] {st.title}: finished in {seconds:.0f}s")
    return markers
