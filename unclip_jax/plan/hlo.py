"""Reading a compiled SPMD program: which activations still hold the whole global batch on a chip.

Under the ``fsdp`` rules every activation should be split over the batch axes (``data`` x ``fsdp``): a chip holds
``batch / (data x fsdp)`` examples of it. The partitioner may instead keep the full batch and split another
dimension (e.g. the channels of a convolution whose kernel is split over ``fsdp``), which costs all-to-alls and
memory. :func:`full_batch_values` lists the program's large values whose leading dimension is the global batch,
by the model scope (``op_name`` metadata) that made them.
"""

from __future__ import annotations

import collections
import math
import re

_VALUE = re.compile(r"= (?:\w+)\[(\d+),([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def full_batch_values(hlo_text: str, global_batch: int, min_elements: int = 1024) -> collections.Counter:
    """``{model scope: count}`` of HLO values shaped ``[global_batch, ...]`` with at least ``min_elements`` per example.

    Args:
      hlo_text: ``compiled.as_text()`` of the per-chip program.
      global_batch: the global batch size; pick one no other dimension of the model has (e.g. 40), or the
        counts also include weights and activations whose first dimension happens to equal it.
      min_elements: ignore values smaller than this per leading index (scalars, per-example vectors).
    """
    found: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        m = _VALUE.search(line)
        if not m or int(m.group(1)) != global_batch:
            continue
        if math.prod(int(x) for x in m.group(2).split(",") if x) < min_elements:
            continue
        name = _OP_NAME.search(line)
        found["/".join(name.group(1).split("/")[-4:-1]) if name else "?"] += 1
    return found
