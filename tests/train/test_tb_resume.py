"""A resumed run's TensorBoard events hold each step once (issue 22): the steps a killed run wrote after the checkpoint
it resumes from are dropped from its event files, as from ``metrics.jsonl``, and the resumed run writes them anew."""

from __future__ import annotations

import os

from clu.metric_writers import SummaryWriter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from unclip_jax.train import metrics


def _segment(tb: str, steps: range, offset: float) -> None:
    writer = SummaryWriter(tb)  # what create_writer's TensorBoard side is
    for step in steps:
        writer.write_scalars(step, {"train/loss": step + offset})
    writer.close()


def _scalars(tb: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(tb, purge_orphaned_data=False)  # no reader-side clean-up: what the files hold
    acc.Reload()
    return [(e.step, round(float(tensor_util.make_ndarray(e.tensor_proto)), 3)) for e in acc.Tensors("train/loss")]


def test_resume_drops_the_re_run_steps_from_the_event_files(tmp_path):
    tb = str(tmp_path / "tb")
    _segment(tb, range(1, 7), 0.0)  # killed after step 6; the newest checkpoint is step 4
    (first,) = os.listdir(tb)
    with open(os.path.join(tb, first), "ab") as f:
        f.write(b"\x10\x00\x00")  # a record cut short by the kill
    assert metrics.drop_events_after(tb, 4) == 2
    assert metrics.drop_events_after(tb, 4) == 0  # nothing left to drop; the file is not rewritten
    _segment(tb, range(5, 9), 0.5)  # the resumed run, in its own event file
    assert len([n for n in os.listdir(tb) if "tfevents" in n]) == 2 and not [n for n in os.listdir(tb) if "tmp" in n]
    # Each step once, with the resumed run's values (files named in the same second are read in either order).
    assert sorted(_scalars(tb)) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5), (6, 6.5), (7, 7.5), (8, 8.5)]


def test_no_event_folder_is_nothing_to_drop(tmp_path):
    assert metrics.drop_events_after(tmp_path / "tb", 3) == 0
