"""The run report: metrics.json, one PNG per picture, and report.html.

report.html is a single self-contained page: CSS inline, every picture embedded as base64 PNG, no
scripts, no external links, so it opens from disk in any browser, offline, and can be mailed around.
The same pictures are also written as files under plots/ for slides and notebooks.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np

from tltool import rundir

from tltool.evaluation import plots

PLOTS_DIR = "plots"
REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
WRONG_GRID_SIZE = 16
THUMBNAIL_PX = 128


def write_report(out: Path, sets: list, probes: list, metrics: dict, run_dir: Path | None = None,
                 title: str = "Run report", ood_sets=()) -> Path:
    """Draw every picture and write metrics.json, plots/*.png and report.html into `out`.

    Args:
        out: the folder to write (created if needed; files of an earlier report are replaced).
        sets: `EvalSet`s, one section each.
        probes: `Probe`s with their predictions.
        metrics: what metrics.json holds.
        run_dir: a run directory whose recipe, summary and training history go into the report, or None.
        title: the page's heading.
        ood_sets: `OodSet`s (folders of images from other domains), with how many the model rejects.

    Returns:
        The path of report.html.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, bytes] = {}
    history = []
    if run_dir is not None:
        from tltool.engine.history import read_history

        history = read_history(Path(run_dir) / rundir.HISTORY_FILE)
        curves = plots.training_curves(history)
        if curves is not None:
            pictures["training_curves"] = curves
    for s in sets:
        m = s.metrics
        pictures[f"{s.picture_prefix}confusion_matrix"] = plots.confusion_matrix(
            m["confusion_matrix"]["matrix"], s.labels, title=f"Confusion matrix: {s.name} (row-normalised, %)")
        pictures[f"{s.picture_prefix}per_class_recall"] = plots.per_class_recall(m["per_class"])
        pictures[f"{s.picture_prefix}reliability"] = plots.reliability_diagram(m["calibration_bins"],
                                                                    m["expected_calibration_error"])
        grid = plots.wrong_predictions(_wrong_items(s))
        if grid is not None:
            pictures[f"{s.picture_prefix}wrong_predictions"] = grid
    for name, png in pictures.items():
        rundir.atomic_write_bytes(out / PLOTS_DIR / f"{name}.png", png)
    rundir.atomic_write_json(out / METRICS_FILE, metrics)
    page = render_html(title, sets, probes, pictures, run_dir=run_dir, ood_sets=ood_sets)
    rundir.atomic_write_text(out / REPORT_FILE, page)
    return out / REPORT_FILE


def _wrong_items(s) -> list[dict]:
    from tltool.data.images import ImageReadError, load_image

    items = []
    for i in s.most_confident_wrong(WRONG_GRID_SIZE):
        try:
            # Squashed to a square, as the model saw it.
            pixels = load_image(s.paths[i], THUMBNAIL_PX)
        except ImageReadError:
            continue
        pred = int(np.argmax(s.probs[i]))
        items.append({"pixels": pixels, "true": s.labels[int(s.y_true[i])], "predicted": s.labels[pred],
                      "confidence": float(s.probs[i][pred]), "name": Path(s.paths[i]).name})
    return items


# ------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:1200px;margin:0 auto;padding:1.5rem}
h1{margin:.2rem 0}h2{border-bottom:2px solid #ddd;padding-bottom:.3rem;margin-top:2.2rem}
.muted{color:#666;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.7rem 1rem;min-width:9rem}
.card b{display:block;font-size:1.5rem}
.probes{background:#fff;border:2px solid #999;border-radius:8px;padding:1rem;margin:1rem 0}
.probes.bad{border-color:#c0392b;background:#fdf0ee}
.probes.good{border-color:#27ae60}
.probes.lean{border-color:#e67e22}
.probe{display:inline-flex;gap:.6rem;align-items:center;margin:.4rem 1.2rem .4rem 0;vertical-align:top}
.probe img{width:56px;height:56px;border:1px solid #aaa;image-rendering:pixelated}
.flag{color:#fff;background:#c0392b;border-radius:4px;padding:0 .35rem;font-size:.8rem}
.ok{color:#fff;background:#27ae60;border-radius:4px;padding:0 .35rem;font-size:.8rem}
.lean{color:#fff;background:#e67e22;border-radius:4px;padding:0 .35rem;font-size:.8rem}
table{border-collapse:collapse;background:#fff;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.low td{background:#fdf0ee}
.pics{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.pics img{max-width:100%;background:#fff;border:1px solid #ddd}
pre{background:#fff;border:1px solid #ddd;padding:.8rem;overflow:auto;font-size:.8rem}
"""


_BOLD = " style='font-weight:bold'"
_BADGES = {"over-confident": "flag", "leaning": "lean", "unsure": "ok", "rejected": "ok"}


def _e(value) -> str:
    return html.escape(str(value))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _thumbnail(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).resize((56, 56), Image.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()


def render_html(title: str, sets: list, probes: list, pictures: dict[str, bytes], run_dir: Path | None = None,
                ood_sets=()) -> str:
    """The report page as one HTML string (pictures embedded)."""
    from tltool import __version__

    summary = rundir.read_summary(run_dir) if run_dir is not None else {}
    name = summary.get("name") or (Path(run_dir).name if run_dir is not None else "")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>{_e(title)}{' - ' + _e(name) if name else ''}</title><style>{_CSS}</style></head><body><main>",
             f"<h1>{_e(title)}{': ' + _e(name) if name else ''}</h1>",
             f"<p class='muted'>Written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} by tltool {_e(__version__)}"
             + (f" &middot; run directory <code>{_e(run_dir)}</code>" if run_dir is not None else "") + "</p>"]
    labels = sets[0].labels if sets else []
    parts.append(_probes_html(probes, labels))
    for s in sets:
        parts.append(_cards_html(s))
    parts.append(_trust_html(sets, ood_sets, summary))
    if "training_curves" in pictures:
        parts.append("<h2>Training</h2><div class='pics'>" + _img(pictures["training_curves"], "training curves")
                     + "</div><p class='muted'>Dotted line: start of stage 2 (backbone layers unfrozen). Rows of "
                       "history.csv in order; each stage counts its own epochs.</p>")
    for s in sets:
        parts.append(_set_html(s, pictures))
    if summary:
        parts.append(_summary_html(summary))
    if run_dir is not None and (Path(run_dir) / rundir.RECIPE_FILE).is_file():
        recipe = (Path(run_dir) / rundir.RECIPE_FILE).read_text(encoding="utf-8")
        parts.append(f"<h2>Recipe</h2><pre>{_e(recipe)}</pre>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _probes_html(probes: list, labels: list[str]) -> str:
    if not probes:
        return ""
    rows = [p.as_dict(labels) for p in probes]
    bad = [r for r in rows if r["overconfident"]]
    items = []
    for probe, row in zip(probes, rows):
        badge = f"<span class='{_BADGES[row['verdict']]}'>{row['verdict']}</span>"
        top = ", ".join(f"{_e(t['label'])} {_pct(t['probability'])}" for t in row["top"])
        items.append(f"<div class='probe'>{_img(_thumbnail(probe.pixels), row['name'])}<div><b>{_e(row['name'])}"
                     f"</b> {badge}<br>&rarr; <b>{_e(row['predicted'])}</b> {_pct(row['confidence'])}"
                     f"<br><span class='muted'>{top}</span></div></div>")
    uniform = 1.0 / max(len(labels), 1)
    rejected = [r for r in rows if r["rejected"]]
    if len(rejected) == len(rows):
        verdict = (f"<p>The out-of-distribution score rejects all {len(rows)} probes: <code>tltool predict</code> "
                   f"answers <b>unknown</b> for them, whatever the softmax leans towards.</p>")
    elif bad:
        worst = max(bad, key=lambda r: r["confidence"])
        verdict = (f"<p><b>Warning:</b> the model is at least 80% sure about {len(bad)} of {len(rows)} images with "
                   f"nothing in them (e.g. {_e(worst['name'])} &rarr; {_e(worst['predicted'])}, "
                   f"{_pct(worst['confidence'])}) and does not reject them as out of distribution. Expect "
                   f"confident answers on images unlike the training data: add an 'other' class with such "
                   f"images.</p>")
    elif any(r["verdict"] == "leaning" for r in rows):
        verdict = (f"<p>No probe reaches 80%, but the model leans towards a class on some images with nothing in "
                   f"them (a uniform guess is {_pct(uniform)}).</p>")
    else:
        verdict = (f"<p>The model is unsure about every probe (a uniform guess is {_pct(uniform)}), as it should "
                   f"be for images that show none of its classes.</p>")
    state = "bad" if bad else ("lean" if any(r["verdict"] == "leaning" for r in rows) else "good")
    if rejected and len(rejected) < len(rows):
        verdict += (f"<p>{len(rejected)} of {len(rows)} probes are rejected as out of distribution "
                    f"(<code>predict</code> answers unknown).</p>")
    return (f"<section class='probes {state}'><h2 style='margin-top:0;border:0'>Sanity probes: "
            f"images with nothing in them</h2>{verdict}{''.join(items)}</section>")


def _cards_html(s) -> str:
    m = s.metrics
    t = m["thresholds"]
    if t["suggested"] is None:
        suggestion = "none reaches " + _pct(t["target_accuracy"])
    elif t["suggested"] == 0:  # every prediction accepted already reaches the target
        suggestion = f"none needed ({_pct(m['accuracy'])} on all)"
    else:
        suggestion = f"{t['suggested']:g} (keeps {_pct(t['suggested_coverage'])})"
    cards = [("images", str(m["num_images"])), ("accuracy", _pct(m["accuracy"])),
             (f"top-{m['top_k']} accuracy", _pct(m["top_k_accuracy"])), ("macro F1", f"{m['macro_avg']['f1']:.3f}"),
             ("weighted F1", f"{m['weighted_avg']['f1']:.3f}"),
             ("calibration error (ECE)", f"{m['expected_calibration_error']:.3f}"),
             ("suggested threshold", suggestion)]
    if m.get("kept_in_distribution") is not None:
        cards.append(("judged in distribution", _pct(m["kept_in_distribution"])))
    body = "".join(f"<div class='card'>{_e(k)}<b>{_e(v)}</b></div>" for k, v in cards)
    return f"<h2>{_e(s.name[:1].upper() + s.name[1:])} set</h2><div class='cards'>{body}</div>"


def _trust_html(sets: list, ood_sets, summary: dict) -> str:
    """Calibration before and after the temperature, the OOD score on other domains, and robustness."""
    out = []
    calibrated = [s for s in sets if s.metrics.get("calibration")]
    if calibrated:
        temperature = calibrated[0].metrics["calibration"]["temperature"]
        rows = "".join(f"<tr><td>{_e(s.name)}</td><td>{c['ece_before']:.3f}</td><td>{c['ece_after']:.3f}</td>"
                       f"<td>{c['nll_before']:.4f}</td><td>{c['nll_after']:.4f}</td></tr>"
                       for s in calibrated for c in [s.metrics["calibration"]])
        out.append(f"<h3>Calibration</h3><p class='muted'>Temperature {temperature:.3f}, fitted on the validation "
                   f"images (a prior holds it near 1 when they are few) and folded into the final layer (every "
                   f"export has it). ECE: expected calibration error, 15 bins; NLL: negative log-likelihood.</p>"
                   f"<table><tr><th>set</th><th>ECE before</th>"
                   f"<th>ECE after</th><th>NLL before</th><th>NLL after</th></tr>{rows}</table>")
    ood = (summary.get("trust") or {}).get("ood")
    if ood:
        out.append(f"<h3>Out-of-distribution score</h3><p class='muted'>Cosine distance from an image's features to "
                   f"the nearest of {ood['bank_rows']} training {'centroids' if ood['centroids'] else 'images'}, "
                   f"divided by the threshold that keeps {_pct(ood['val_kept'])} of the validation images: "
                   f"<code>ood_score</code> above 1 means <b>unknown</b>.</p>")
    for o in ood_sets:
        out.append(_ood_set_html(o))
    robust = [s for s in sets if s.metrics.get("robustness")]
    for s in robust:
        r = s.metrics["robustness"]
        cells = [("clean", r["clean"])] + [(f"FGSM {k}", v) for k, v in r["fgsm"].items()] \
            + [(f"noise &sigma; {k}", v) for k, v in r["gaussian_noise"].items()]
        out.append(f"<h3>Small perturbations ({_e(s.name)}, {r['images']} images)</h3><p class='muted'>Accuracy "
                   f"after each pixel moves by eps (of the 0-255 range) in the direction that raises the loss most "
                   f"(FGSM), or after Gaussian noise. A measurement: the model has no defence against such "
                   f"changes.</p><table><tr>" + "".join(f"<th>{k}</th>" for k, _ in cells) + "</tr><tr>"
                   + "".join(f"<td>{_pct(v)}</td>" for _, v in cells) + "</tr></table>")
    return f"<h2>Trust</h2>{''.join(out)}" if out else ""


def _ood_set_html(o) -> str:
    from tltool.data.images import ImageReadError, load_image

    m = o.metrics
    if m["separated"]:
        verdict = (f"The score separates these images from the in-domain ones: AUROC {m['auroc']:.3f} "
                   f"(95% interval {m['auroc_low']:.3f}-{m['auroc_high']:.3f}).")
    else:
        verdict = (f"<b>No measurable separation</b>: AUROC {m['auroc']:.3f} (95% interval {m['auroc_low']:.3f}-"
                   f"{m['auroc_high']:.3f}) includes chance (0.5). To this model these images look like its "
                   f"training data; do not rely on the score to reject them.")
    items = []
    for i in o.examples():
        try:
            pixels = load_image(o.paths[i], 56)
        except ImageReadError:
            continue
        unknown = o.ood_score[i] > 1.0
        answer = "unknown" if unknown else _e(o.labels[int(np.argmax(o.probs[i]))])
        items.append(f"<div class='probe'>{_img(_thumbnail(pixels), Path(o.paths[i]).name)}<div>"
                     f"<span class='{'ok' if unknown else 'flag'}'>{answer}</span><br>"
                     f"<span class='muted'>ood_score {o.ood_score[i]:.2f}</span></div></div>")
    return (f"<h3>Other domains: {_e(o.name)}</h3><p>{_pct(m['rejected'])} of {m['images']} images rejected as "
            f"unknown ({_pct(m['inside_rejected'])} of the {m['inside_images']} in-domain images). {verdict}</p>"
            + "".join(items))


def _set_html(s, pictures: dict[str, bytes]) -> str:
    m = s.metrics
    out = [f"<h2>{_e(s.name[:1].upper() + s.name[1:])} set: details</h2><div class='pics'>"]
    for kind, alt in (("confusion_matrix", "confusion matrix"), ("per_class_recall", "recall per class"),
                      ("reliability", "reliability diagram")):
        if f"{s.picture_prefix}{kind}" in pictures:
            out.append(_img(pictures[f"{s.picture_prefix}{kind}"], f"{s.name} {alt}"))
    out.append("</div>")
    if f"{s.picture_prefix}wrong_predictions" in pictures:
        out.append("<h3>Most confidently wrong</h3><div class='pics'>"
                   + _img(pictures[f"{s.picture_prefix}wrong_predictions"], f"{s.name} wrong predictions") + "</div>")
    else:
        out.append("<p>No misclassified images.</p>")
    rows = "".join(
        f"<tr class='{'low' if v['recall'] < 0.5 and v['support'] else ''}'><td>{_e(k)}</td>"
        f"<td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td><td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>"
        for k, v in m["per_class"].items())
    for name in ("macro_avg", "weighted_avg"):
        v = m[name]
        rows += (f"<tr><td><i>{name.replace('_', ' ')}</i></td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}"
                 f"</td><td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>")
    out.append("<h3>Per class</h3><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
               f"<th>support</th></tr>{rows}</table>")
    t = m["thresholds"]
    trows = "".join(
        f"<tr{_BOLD if r['threshold'] == t['suggested'] else ''}><td>{r['threshold']:g}</td>"
        f"<td>{_pct(r['coverage'])}</td><td>{r['accepted']}</td><td>{_pct(r['accuracy'])}</td></tr>"
        for r in t["rows"])
    out.append("<h3>Confidence thresholds</h3><p class='muted'>Accept a prediction only when its confidence is at "
               f"least the threshold. Suggested ({_e(t['rule'])}): <b>{_e(t['suggested'])}</b>.</p>"
               f"<table><tr><th>threshold</th><th>coverage</th><th>accepted</th><th>accuracy of accepted</th></tr>"
               f"{trows}</table>")
    skipped = m.get("skipped_files") or []
    if skipped:
        out.append(_skipped_html(skipped))
    return "".join(out)


def _skipped_html(skipped: list[dict], limit: int = 50) -> str:
    items = "".join(f"<li><code>{_e(s['path'])}</code>: {_e(s['reason'])}</li>" for s in skipped[:limit])
    more = f"<li>... and {len(skipped) - limit} more</li>" if len(skipped) > limit else ""
    return f"<h3>Skipped files ({len(skipped)})</h3><ul>{items}{more}</ul>"


def _summary_html(summary: dict) -> str:
    facts = [("backbone", summary.get("backbone")), ("weights", summary.get("weights")),
             ("image size", summary.get("image_size")), ("classes", summary.get("num_classes")),
             ("validation accuracy", summary.get("val_accuracy")), ("test accuracy", summary.get("test_accuracy"))]
    out = ["<h2>Data and run summary</h2><table>"]
    out += [f"<tr><td>{_e(k)}</td><td>{_e(_pct(v) if 'accuracy' in k else v)}</td></tr>"
            for k, v in facts if v is not None]
    out.append("</table>")
    counts = summary.get("class_counts") or {}
    splits = [k for k in ("train", "val", "test") if counts.get(k)]
    if splits:
        classes = summary.get("classes") or list(counts[splits[0]])
        head = "".join(f"<th>{_e(k)}</th>" for k in splits)
        rows = "".join(f"<tr><td>{_e(c)}</td>" + "".join(f"<td>{counts[k].get(c, 0)}</td>" for k in splits) + "</tr>"
                       for c in classes)
        total = "".join(f"<td><b>{sum(counts[k].values())}</b></td>" for k in splits)
        out.append(f"<h3>Images per class</h3><table><tr><th>class</th>{head}</tr>{rows}"
                   f"<tr><td><b>total</b></td>{total}</tr></table>")
    timings = summary.get("timings") or {}
    if timings:
        out.append("<h3>Timings</h3><table>" + "".join(
            f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in timings.items()) + "</table>")
    versions = summary.get("versions")
    if versions:
        out.append(f"<p class='muted'>{_e(json.dumps(versions))}</p>")
    if summary.get("skipped_files"):
        out.append(_skipped_html(summary["skipped_files"]))
    return "".join(out)
