"""Op-by-op profile of a train step, ours against PyTorch's, in the same op categories.

Ours: a ``jax.profiler`` trace of the compiled step; XLA's CPU runtime records one event per executed HLO
instruction (thunk) with its name, and each instruction is put in a category from the optimised HLO text: its
opcode, the ops fused into it, its convolution window and its ``op_name`` (JAX's name stack: transformations,
Flax module paths and the named scopes :data:`unclip_jax.layers.attention.ATTENTION_SCOPE`,
:data:`unclip_jax.train.optim.OPTIMIZER_SCOPE`, :data:`unclip_jax.train.state.EMA_SCOPE`).
PyTorch's: ``torch.profiler`` self times of every recorded op, each op in the category of its outermost
recognised ancestor (``aten::convolution`` -> conv forward, ``ConvolutionBackward0`` -> conv backward, the
optimiser's ``record_function`` -> optimiser + EMA, ...).

A convolution's direction: a convolution whose window is wider than 3 taps is a weight gradient (its window is
the activation); otherwise one under ``transpose(...)`` in its op name is an input gradient, else a forward conv.
PyTorch's oneDNN backward computes both gradients in one op: its conv backward is one row.

Fused instructions mix categories: a fusion counts where its root op's name puts it (GroupNorm statistics fused
with the following SiLU count as norm). Times are per step (the mean of the profiled steps); the categories of
a side sum to that side's total op time. Op time can exceed the wall time where XLA runs independent thunks
concurrently.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unclip_jax.layers.attention import ATTENTION_SCOPE
from unclip_jax.train.optim import OPTIMIZER_SCOPE
from unclip_jax.train.state import EMA_SCOPE

CATEGORIES: tuple[str, ...] = (
    "conv forward",
    "conv input-grad",
    "conv weight-grad",
    "conv backward (input + weight)",
    "norm (GroupNorm / LayerNorm) + grad",
    "attention core (qk, softmax, pv) + grad",
    "matmul (dense layers)",
    "elementwise (incl. fused reductions)",
    "optimizer + EMA",
    "copies / transposes / pads",
    "other",
)
(
    CONV_FWD,
    CONV_INPUT_GRAD,
    CONV_WEIGHT_GRAD,
    CONV_BACKWARD,
    NORM,
    ATTENTION,
    MATMUL,
    ELEMENTWISE,
    OPTIMIZER,
    COPIES,
    OTHER,
) = CATEGORIES

_DATA_MOVEMENT = {
    "parameter",
    "constant",
    "copy",
    "transpose",
    "bitcast",
    "reshape",
    "broadcast",
    "slice",
    "concatenate",
    "pad",
    "dynamic-slice",
    "dynamic-update-slice",
    "reverse",
    "tuple",
    "get-tuple-element",
    "iota",
    "convert",
}
_CONTAINERS = {"while", "call", "conditional"}  # their ops have events of their own
_NORM_SEGMENT = re.compile(r"^(norm\w*|\w*_norm\w*|group_norm|layer_norm|ln_\w+|\w*layernorm\w*)$", re.IGNORECASE)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w\[])([a-z][a-z0-9\-_]*)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(instruction name -> its HLO line, computation name -> its instruction lines) of an HLO module's text."""
    instrs: dict[str, str] = {}
    comps: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("(")[0]:
                current = comps.setdefault(m.group(1), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            instrs[m.group(1)] = line
            current.append(line)
    return instrs, comps


def _opcode(line: str) -> str:
    rhs = line.split("=", 1)[1]
    m = _OPCODE.search(rhs)
    return m.group(1) if m else ""


def _op_name(line: str) -> str:
    m = re.search(r'op_name="([^"]*)"', line)
    return m.group(1) if m else ""


def _window_max(line: str) -> int:
    m = re.search(r"window=\{size=([\dx]+)", line)
    return max(int(v) for v in m.group(1).split("x")) if m else 1


def _conv_direction(line: str, op_name: str) -> str:
    if _window_max(line) > 3:
        return CONV_WEIGHT_GRAD
    return CONV_INPUT_GRAD if "transpose(" in op_name else CONV_FWD


def _body(line: str, comps: dict[str, list[str]]) -> list[str]:
    m = re.search(r"calls=%?([\w.\-]+)", line)
    return comps.get(m.group(1), []) if m else []


def classify_hlo(name: str, instrs: dict[str, str], comps: dict[str, list[str]]) -> str | None:
    """The category of HLO instruction ``name`` (None for while / call / conditional, whose ops count alone)."""
    line = instrs.get(name)
    if line is None:
        return OTHER
    opcode = _opcode(line)
    if opcode in _CONTAINERS:
        return None
    body = _body(line, comps) if opcode == "fusion" else []
    lines = body or [line]
    op_names = [_op_name(line)] + [_op_name(b) for b in body]
    op_name = next((n for n in op_names if n), "")
    if any(OPTIMIZER_SCOPE in n or EMA_SCOPE in n for n in op_names if n):
        return OPTIMIZER
    convs = [b for b in lines if _opcode(b) == "convolution"]
    if convs:
        conv_name = next((_op_name(c) for c in convs if _op_name(c)), op_name)
        return _conv_direction(convs[0], conv_name)
    if ATTENTION_SCOPE in op_name:
        return ATTENTION
    opcodes = {_opcode(b) for b in lines}
    if opcodes & {"dot", "custom-call"}:
        if any("conv_general_dilated" in n for n in op_names):
            return CONV_INPUT_GRAD if "transpose(" in op_name else CONV_FWD
        return MATMUL
    if any(_NORM_SEGMENT.match(s) for s in re.findall(r"[A-Za-z_]\w*", op_name)):
        return NORM
    if opcodes <= _DATA_MOVEMENT:
        return COPIES
    if opcode in ("fusion",) or opcodes - _DATA_MOVEMENT:
        return ELEMENTWISE if not opcodes & {"rng", "rng-bit-generator", "gather", "scatter", "sort"} else OTHER
    return OTHER


def trace_op_times(trace_dir: Path, module_prefix: str = "jit_") -> dict[str, float]:
    """Seconds per HLO instruction name summed over a ``jax.profiler`` trace (its perfetto JSON) of modules whose
    name starts with ``module_prefix``."""
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    data = json.loads(gzip.open(files[-1]).read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    out: dict[str, float] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args:
            continue
        if not str(args.get("hlo_module", "")).startswith(module_prefix):
            continue
        out[args["hlo_op"]] = out.get(args["hlo_op"], 0.0) + float(e.get("dur", 0.0)) * 1e-6
    return out


def jax_profile(compiled: Any, run: Callable[[], Any], steps: int = 2) -> dict[str, Any]:
    """Category -> seconds per step of ``run()`` (calls of the compiled program ``compiled``), with ``total`` (their
    sum), ``wall`` (seconds per step while traced) and ``top`` (the 12 slowest instructions)."""
    import time

    import jax

    instrs, comps = parse_hlo(compiled.as_text())
    with tempfile.TemporaryDirectory(prefix="unclip_prof_") as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            wall = (time.perf_counter() - t0) / steps
        times = trace_op_times(Path(tmp))
    return summarize_jax(times, instrs, comps, steps, wall)


def summarize_jax(
    times: dict[str, float], instrs: dict[str, str], comps: dict[str, list[str]], steps: int, wall: float
) -> dict[str, Any]:
    """Per-step category sums of per-instruction ``times`` (see :func:`jax_profile`)."""
    cats = dict.fromkeys(CATEGORIES, 0.0)
    per_op = []
    for name, sec in times.items():
        cat = classify_hlo(name, instrs, comps)
        if cat is None:
            continue
        cats[cat] += sec / steps
        per_op.append((sec / steps, name, cat))
    per_op.sort(reverse=True)
    return {
        "categories": cats,
        "total": sum(cats.values()),
        "wall": wall,
        "top": [{"op": n, "category": c, "seconds": s} for s, n, c in per_op[:12]],
    }


# PyTorch op names -> category, first match wins; an op takes the category of its outermost matching ancestor.
TORCH_RULES: tuple[tuple[str, str], ...] = (
    (rf"^{OPTIMIZER_SCOPE}$", OPTIMIZER),
    (r"ConvolutionBackward|convolution_backward", CONV_BACKWARD),
    (r"^aten::(conv2d|convolution|_convolution|mkldnn_convolution|slow_conv)", CONV_FWD),
    (r"group_norm|GroupNorm|layer_norm|LayerNorm", NORM),
    (r"scaled_dot_product|[Aa]ttention|[Ss]oftmax|^aten::b(add)?mm|BmmBackward|BaddbmmBackward", ATTENTION),
    (r"^aten::(linear|addmm|mm|matmul)$|AddmmBackward|MmBackward|LinearBackward", MATMUL),
)
TORCH_COPIES = re.compile(
    r"^aten::(copy_|contiguous|clone|_to_copy|to|cat|pad|constant_pad_nd|upsample_nearest2d|permute|transpose|"
    r"reshape|view|_unsafe_view|t|expand|slice|select|split|chunk|narrow|index_select|stack)$"
    r"|CatBackward|PermuteBackward|TransposeBackward|ViewBackward|UnsafeViewBackward|ReshapeAliasBackward|"
    r"SliceBackward|SplitBackward|CloneBackward|ExpandBackward|TBackward|UpsampleNearest2DBackward"
)
TORCH_OTHER = re.compile(r"^aten::(randn|rand|randint|normal_|uniform_|empty|empty_like|empty_strided|zeros|ones)")


def classify_torch(chain: list[str]) -> str:
    """Category of a PyTorch op given its ancestors' names and its own, outermost first."""
    for name in chain:
        for pattern, cat in TORCH_RULES:
            if re.search(pattern, name):
                return cat
    own = chain[-1]
    if TORCH_COPIES.search(own):
        return COPIES
    if TORCH_OTHER.search(own) or not (own.startswith("aten::") or "Backward" in own):
        return OTHER
    return ELEMENTWISE


def torch_profile(step: Callable[[], Any], steps: int = 2) -> dict[str, Any]:
    """Category -> seconds per step of ``step()`` from ``torch.profiler`` self CPU times (see the module)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    cats = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[tuple[str, str], float] = {}
    for e in prof.events():
        chain = []
        node = e
        while node is not None:
            chain.append(node.name)
            node = node.cpu_parent
        cat = classify_torch(chain[::-1])
        sec = e.self_cpu_time_total * 1e-6 / steps
        cats[cat] += sec
        per_name[(e.name, cat)] = per_name.get((e.name, cat), 0.0) + sec
    top = sorted(((s, n, c) for (n, c), s in per_name.items()), reverse=True)[:12]
    return {
        "categories": cats,
        "total": sum(cats.values()),
        "wall": wall,
        "top": [{"op": n, "category": c, "seconds": s} for s, n, c in top],
    }


def job_profile(task: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """Our compiled train step and PyTorch's, each profiled op by op in one process (``repeats`` steps each)."""
    import jax

    from unclip_jax.bench import jax_jobs, torch_jobs, workloads
    from unclip_jax.bench.measure import block, peak_rss_mb

    trainer, batch, state, step = jax_jobs.train_setup(task, workdir)
    if not (workdir / task).exists():
        variables = jax.device_get({"params": state.params, **state.extra})
        workloads.save_weights(task, trainer.module, variables, workdir / task)
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        block(metrics)

    run()
    run()
    ours = jax_profile(compiled, run, max(repeats, 1))
    _, _, torch_step = torch_jobs.torch_train_setup(task, workdir)
    torch_step()
    torch_step()
    ref = torch_profile(torch_step, max(repeats, 1))
    return {"jax": ours, "torch": ref, "peak_rss_mb": peak_rss_mb()}


def profile_table(title: str, result: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per category, ours and PyTorch's milliseconds per step and their ratio."""
    ours, ref = result["jax"], result["torch"]

    def ms(v: float) -> str:
        return f"{v * 1e3:.1f}"

    def ratio(a: float, b: float) -> str:
        return f"x{a / b:.2f}" if a > 0 and b > 0 else "-"

    lines = [
        f"### {title}",
        "",
        "| op category | ours ms | torch ms | ours / torch |",
        "|---|---|---|---|",
    ]
    for cat in CATEGORIES:
        a, b = ours["categories"][cat], ref["categories"][cat]
        if a == 0 and b == 0:
            continue
        lines.append(f"| {cat} | {ms(a)} | {ms(b)} | {ratio(a, b)} |")
    conv_bwd = (CONV_INPUT_GRAD, CONV_WEIGHT_GRAD, CONV_BACKWARD)
    a = sum(ours["categories"][c] for c in conv_bwd)
    b = sum(ref["categories"][c] for c in conv_bwd)
    lines.append(f"| (all conv backward) | {ms(a)} | {ms(b)} | {ratio(a, b)} |")
    lines.append(
        f"| **total op time** | {ms(ours['total'])} | {ms(ref['total'])} | {ratio(ours['total'], ref['total'])} |"
    )
    lines.append(
        f"| step wall time (profiled) | {ms(ours['wall'])} | {ms(ref['wall'])} | {ratio(ours['wall'], ref['wall'])} |"
    )
    lines.append("")
    return lines
