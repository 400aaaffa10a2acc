"""`make bench`: our JAX cascade against diffusers/PyTorch with the same weights, in one run.

Usage::

    python -m unclip_jax.bench --out=BENCHMARKS.md            # everything
    python -m unclip_jax.bench --quick --only conv,prior       # fewer repeats, some phases

Phases (``--only``, :data:`PHASES`): ``conv`` (3x3 conv forward+backward micro-benchmark: ``lax`` autodiff vs our
``custom_vjp`` (:mod:`unclip_jax.layers.conv`) vs torch), one per training task with a diffusers counterpart (one
train step of the task's ``bench`` experiment, :mod:`unclip_jax.bench.workloads`), and ``cascade`` (text to
256x256 with every stage's default sampling settings, against diffusers ``UnCLIPPipeline``). The f32 matmul peak
of the machine is measured in every run.

Method: every measurement runs in its own subprocess (its peak RSS is ``ru_maxrss`` of that process); the JAX
process builds the model, writes its weights through the weight bridge (:mod:`unclip_jax.convert`) and the
PyTorch process loads them with ``from_pretrained``. Times are medians over ``--repeats`` runs after warm-up;
compile time = first call - median steady call. FLOPs: ours from XLA's cost analysis of the compiled program,
torch's from ``torch.utils.flop_counter.FlopCounterMode``. float32, torch with ``torch.set_num_threads(2)``. The
JAX train step is the train loop's own ``make_train_step`` (task loss + AdamW with clipping + EMA); the torch step
is the network's forward/backward with the same inputs (:mod:`unclip_jax.bench.torch_jobs`). Writes ``--out``
(markdown, :mod:`unclip_jax.bench.report`) and the same name with ``.json``.

Rooms: :mod:`.measure` (timing, FLOPs, memory), :mod:`.micro` (matmul, conv), :mod:`.workloads` (what is
measured), :mod:`.jax_jobs` / :mod:`.torch_jobs` (the two sides), :mod:`.runner` (subprocesses, command line),
:mod:`.report` (markdown).
"""

from unclip_jax.bench.runner import PHASES, main

__all__ = ["PHASES", "main"]
