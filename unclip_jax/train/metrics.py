"""Metrics: clu writers (TensorBoard + JSON lines), throughput / achieved FLOP/s, progress line, NaN guard.

Keys follow the field's names: ``train/loss``, ``train/mse``, ``train/grad_norm``,
``train/param_norm``, ``train/lr``, ``perf/steps_per_sec``, ``perf/examples_per_sec``,
``perf/flops_per_sec`` (achieved: XLA's cost analysis of the compiled step x steps/s),
``preview/...``. ``WORKDIR/metrics.jsonl`` has one JSON object per write:
``{"step": 100, "train/loss": 0.12, ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers
from clu.metric_writers import interface

log = logging.getLogger("unclip_jax.train")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; ``step`` is the first bad step (its state was not saved).

    ``checkpoint`` names the newest checkpoint that verifies (what a rerun resumes from), or ``None``.
    """

    def __init__(self, step: int, metrics: Mapping[str, float], checkpoint: str | None = None):
        self.step = step
        self.checkpoint = checkpoint
        where = (
            f"the newest checkpoint that verifies is {checkpoint}, from before it"
            if checkpoint
            else "no checkpoint was saved before it"
        )
        super().__init__(
            f"non-finite loss at step {step} ({', '.join(f'{k}={v}' for k, v in sorted(metrics.items()))}); "
            f"stopping without saving this state: {where}. Lower config.optim.lr (or set config.optim.grad_clip_norm) "
            "and rerun to resume from it"
        )


class JsonlWriter(interface.MetricWriter):
    """A clu MetricWriter appending scalars (and text) to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a")  # noqa: SIM115 - closed in close()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._f.write(json.dumps({"step": int(step), **dict(texts)}) + "\n")

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        self._f.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def create_writer(workdir: str, is_primary: bool) -> metric_writers.MetricWriter:
    """TensorBoard (``WORKDIR/tb``) + ``WORKDIR/metrics.jsonl`` on the primary process; logging elsewhere."""
    if not is_primary:
        return metric_writers.create_default_writer(None, just_logging=True)
    tb = metric_writers.create_default_writer(os.path.join(workdir, "tb"), asynchronous=True)
    return metric_writers.MultiWriter([tb, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Removes the rows of steps after ``step`` from a ``metrics.jsonl`` (a resumed run writes them anew, so the file
    keeps one row per step); rewritten in place, so a writer appending to it stays valid. Returns the rows dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "r+") as f:
        lines = f.readlines()
        keep = [line for line in lines if not _after(line, step)]
        if len(keep) != len(lines):
            f.seek(0)
            f.writelines(keep)
            f.truncate()
    if len(keep) != len(lines):
        log.info(
            "%s: dropped %d rows after step %d (the resumed run writes them again)", path, len(lines) - len(keep), step
        )
    return len(lines) - len(keep)


def drop_events_after(tb_dir: str | os.PathLike, step: int) -> int:
    """Removes the events of steps after ``step`` from the TensorBoard event files in ``tb_dir``, as
    :func:`drop_rows_after` does for ``metrics.jsonl``: a resumed run writes those steps again (in a new event file),
    and TensorBoard would otherwise show each re-run step twice. A file holding such steps is rewritten beside itself
    and moved into place; a record truncated by a kill ends the file (TensorBoard's own reader stops there too);
    files without later steps (the resumed run's own) are not touched. Returns the events dropped."""
    if not os.path.isdir(tb_dir):
        return 0
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for name in sorted(os.listdir(tb_dir)):
        path = os.path.join(tb_dir, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        records = list(RawEventFileLoader(path).Load())
        keep = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(keep) == len(records):
            continue
        tmp = os.path.join(tb_dir, f".{name}.tmp-{os.getpid()}")  # not a "*tfevents*" name: TensorBoard skips it
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for r in keep:
                writer.write(r)
        os.replace(tmp, path)
        dropped += len(records) - len(keep)
    if dropped:
        log.info("%s: dropped %d events after step %d (the resumed run writes them again)", tb_dir, dropped, step)
    return dropped


def _after(line: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (for reports and tests)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_flops(compiled: Any, num_devices: int) -> float | None:
    """FLOPs of one train step from XLA's cost analysis (the per-device SPMD program x devices)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend provides it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"]) * num_devices


def first_non_finite(rows: list[tuple[int, Mapping[str, Any]]]) -> tuple[int, dict[str, float]] | None:
    """The first (step, metrics) whose loss (or grad norm) is NaN/inf, else None."""
    for step, m in rows:
        vals = {k: float(np.asarray(v)) for k, v in m.items()}
        if any(not math.isfinite(vals.get(k, 0.0)) for k in ("train/loss", "train/grad_norm")):
            return step, vals
    return None


def mean_metrics(rows: list[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
    """Per-key mean over logged steps (``train/lr`` is the last value)."""
    out: dict[str, float] = {}
    for k in rows[-1][1]:
        vals = [float(np.asarray(m[k])) for _, m in rows if k in m]
        out[k] = vals[-1] if k == "train/lr" else float(np.mean(vals))
    return out


class Progress:
    """Steps/s, examples/s, achieved FLOP/s and a one-line progress report with ETA."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        global_batch: int,
        flops_per_step: float | None,
        peak_flops_per_sec: float | None = None,
    ):
        self.total, self.batch, self.flops, self.peak = total_steps, global_batch, flops_per_step, peak_flops_per_sec
        self._t, self._step = time.perf_counter(), start_step

    def update(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        dt, ds = now - self._t, step - self._step
        self._t, self._step = now, step
        if ds <= 0 or dt <= 0:
            return {}
        sps = ds / dt
        out = {"perf/steps_per_sec": sps, "perf/examples_per_sec": sps * self.batch}
        if self.flops:
            out["perf/flops_per_sec"] = sps * self.flops
            if self.peak:  # model-FLOPs utilisation against the devices' published peak (TPUs)
                out["perf/mfu"] = sps * self.flops / self.peak
        return out

    def line(self, step: int, scalars: Mapping[str, float]) -> str:
        sps = scalars.get("perf/steps_per_sec")
        eta = (self.total - step) / sps if sps else float("nan")
        parts = [f"step {step}/{self.total}", f"loss {scalars.get('train/loss', float('nan')):.5g}"]
        if sps:
            parts.append(f"{sps:.2f} steps/s")
        if "perf/flops_per_sec" in scalars:
            parts.append(f"{scalars['perf/flops_per_sec'] / 1e9:.1f} GFLOP/s")
        if "perf/mfu" in scalars:
            parts.append(f"MFU {100 * scalars['perf/mfu']:.1f}%")
        if math.isfinite(eta):
            parts.append(f"ETA {_hms(eta)}")
        return " | ".join(parts)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def save_image_grid(images: np.ndarray, path: str | os.PathLike, rows: int | None = None) -> str:
    """Writes ``[N, H, W, 3]`` images in [0, 1] as one PNG grid (``rows`` rows; default near-square)."""
    from PIL import Image

    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n, h, w, c = images.shape
    rows = rows or max(1, int(math.floor(math.sqrt(n))))
    cols = math.ceil(n / rows)
    grid = np.ones((rows * h, cols * w, c), np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray((grid * 255.0 + 0.5).astype(np.uint8).squeeze()).save(path)
    return str(path)
