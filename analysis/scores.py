"""The score explorer: one self-contained interactive HTML page about a scored shard directory.

    hpctrain report scores DATA_DIR --out scores.html
    python -m analysis.scores DATA_DIR --out scores.html [--keep-fraction 0.7 --keep hardest]

Per score method: histograms per class, and a 2-D PCA of the stored embedding (or of the
inputs, when no embedding was stored) coloured by score, with the samples a filter would
drop marked ×. Hovering or clicking a point draws that sample (1-D trace or image). Plotly's
JavaScript is embedded, so the page opens offline.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from analysis import write_atomic
from hpctrain.data.filtering import select_kept
from hpctrain.data.scoring import read_scores
from hpctrain.data.shards import manifest_hash, open_directory
from hpctrain.errors import UserError

MAX_POINTS = 3000        # samples shown in the scatter (and embedded for the viewer)

_VIEWER_JS = """
window.addEventListener('load', function () {
  var samples = JSON.parse(document.getElementById('samples').textContent);
  var scatter = document.getElementById('pca'), view = document.getElementById('sample-view');
  function show(ev) {
    var i = ev.points[0].customdata[0], x = samples.x[i], title = 'sample_id ' + samples.id[i] +
        ', label ' + samples.label[i];
    var trace = Array.isArray(x[0]) ? {z: x, type: 'heatmap', colorscale: 'Greys', reversescale: true}
                                    : {y: x, type: 'scatter', mode: 'lines'};
    Plotly.react(view, [trace], {title: {text: title}, height: 320, margin: {t: 40},
                                 yaxis: Array.isArray(x[0]) ? {autorange: 'reversed'} : {}});
  }
  scatter.on('plotly_hover', show);
  scatter.on('plotly_click', show);
});
"""


def _viewable(x: np.ndarray) -> np.ndarray:
    """Samples as 1-D traces or 2-D images: channels (first or last axis, ≤ 4) are averaged."""
    if x.ndim == 4:
        x = x.mean(axis=1) if x.shape[1] <= 4 else x.mean(axis=3)
    if x.ndim > 3:
        x = x.reshape(len(x), -1)
    return x


def _pca(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA
    pca = PCA(n_components=2, random_state=0).fit(features)
    return pca.transform(features), pca.explained_variance_ratio_


def _histograms(method: str, scores: np.ndarray, labels: np.ndarray) -> go.Figure:
    fig = go.Figure([go.Histogram(x=scores[labels == c], name=f"class {c}", opacity=0.6, nbinsx=50)
                     for c in np.unique(labels)])
    fig.update_layout(barmode="overlay", title=f"{method}: score distribution per class (click legend to toggle)",
                      xaxis_title=f"{method} score (higher = harder)", yaxis_title="samples", height=380)
    return fig


def _scatter(xy: np.ndarray, shown: np.ndarray, stored, kept: dict[str, np.ndarray], basis: str,
             keep_label: str) -> go.Figure:
    """One kept and one dropped trace per method; buttons switch the method."""
    ids, labels = stored.sample_ids[shown], stored.labels[shown]
    traces, methods = [], list(stored.scores)
    for m, method in enumerate(methods):
        score = stored.scores[method][shown]
        for is_kept, symbol in ((True, "circle"), (False, "x")):
            sel = np.flatnonzero(kept[method][shown] == is_kept)
            traces.append(go.Scattergl(
                x=xy[sel, 0], y=xy[sel, 1], mode="markers", visible=m == 0,
                name=f"{method}: {'kept' if is_kept else 'dropped'}", customdata=sel[:, None],
                marker=dict(color=score[sel], colorscale="Viridis", cmin=float(score.min()), cmax=float(score.max()),
                            symbol=symbol, size=6, showscale=is_kept, colorbar=dict(title=method)),
                text=[f"sample_id {i}<br>label {c}<br>{method} {s:.4g}" for i, c, s in zip(ids[sel], labels[sel], score[sel])],
                hoverinfo="text"))
    buttons = [dict(label=method, method="update",
                    args=[{"visible": [t // 2 == m for t in range(len(traces))]}])
               for m, method in enumerate(methods)]
    fig = go.Figure(traces)
    fig.update_layout(title=f"PCA of the {basis}: colour = score, × = dropped by {keep_label} "
                            f"(hover or click a point to see the sample)", height=560,
                      updatemenus=[dict(buttons=buttons, direction="down", x=1.0, y=1.15)],
                      xaxis_title="PC 1", yaxis_title="PC 2", legend=dict(orientation="h", y=-0.15))
    return fig


def _provenance_table(stored, current_hash: str) -> str:
    rows = []
    for method, attrs in stored.attrs.items():
        stale = attrs.get("manifest_sha256") not in ("", current_hash)
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            method, attrs.get("model", "?"), attrs.get("step", "?"), attrs.get("date", "?"),
            "STALE: shards changed since scoring" if stale else "matches")) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("method", "model", "step", "date", "dataset manifest"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def write_scores_report(data_dir: Path, out: Path, keep_fraction: float = 0.7, keep: str = "hardest") -> None:
    """Write the score explorer page for the shard directory `data_dir` (its scores.h5) to `out`."""
    data_dir, out = Path(data_dir), Path(out)
    stored = read_scores(data_dir / "scores.h5")
    if not stored.scores:
        raise UserError(f"{data_dir / 'scores.h5'} holds no scores; run `hpctrain score --data {data_dir} --method el2n`")
    directory = open_directory(data_dir)
    by_id = np.argsort(directory.sample_ids, kind="stable")
    where = by_id[np.searchsorted(directory.sample_ids[by_id], stored.sample_ids).clip(0, len(by_id) - 1)]
    if not np.array_equal(directory.sample_ids[where], stored.sample_ids):
        raise UserError(f"{data_dir / 'scores.h5'} scores samples that are not in {data_dir}; re-run `hpctrain score`")
    keep_label = f"keep {keep} {keep_fraction:g}"
    kept = {m: np.isin(np.arange(len(s)), select_kept(stored.labels, s, keep_fraction, keep))
            for m, s in stored.scores.items()}

    n = len(stored.sample_ids)
    shown = np.sort(np.random.default_rng(0).choice(n, size=min(n, MAX_POINTS), replace=False))
    x, _ = directory.view(where[shown]).get(np.arange(len(shown)))
    if stored.embedding is not None:
        features, basis = stored.embedding[shown], f"embedding ({stored.embedding_attrs.get('model', '?')})"
    else:
        features, basis = x.reshape(len(x), -1), "inputs (no embedding stored)"
    xy, variance = _pca(features.astype(np.float64))
    basis += f", {100 * variance.sum():.0f}% of variance"

    figures = [_histograms(m, s, stored.labels) for m, s in stored.scores.items()]
    scatter = _scatter(xy, shown, stored, kept, basis, keep_label)
    parts = [fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures)]
    parts.append(scatter.to_html(full_html=False, include_plotlyjs=False, div_id="pca"))
    samples = {"id": stored.sample_ids[shown].tolist(), "label": stored.labels[shown].tolist(),
               "x": np.round(_viewable(x), 5).tolist()}
    counts = ", ".join(f"{m}: {int(k.sum())} kept" for m, k in kept.items())
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>scores of {html.escape(str(data_dir))}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>Importance scores of {html.escape(str(data_dir))}</h1>
<p>{n} training samples, {len(np.unique(stored.labels))} classes; filter shown: {html.escape(keep_label)}
({html.escape(counts)}); scatter shows {len(shown)} samples.</p>
{_provenance_table(stored, manifest_hash(data_dir))}
{''.join(parts)}
<h2>Sample</h2><div id="sample-view"><p>Hover over or click a point in the PCA plot.</p></div>
<script id="samples" type="application/json">{json.dumps(samples)}</script>
<script>{_VIEWER_JS}</script>
</body></html>
"""
    write_atomic(out, page)


def _run(args: argparse.Namespace) -> None:
    write_scores_report(args.data_dir, args.out, args.keep_fraction, args.keep)
    print(f"wrote {args.out}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="shard directory with scores.h5 (from `hpctrain score`)")
    parser.add_argument("--out", type=Path, default=Path("scores.html"), help="HTML file (default scores.html)")
    parser.add_argument("--keep-fraction", type=float, default=0.7, help="filter to mark kept/dropped (default 0.7)")
    parser.add_argument("--keep", default="hardest", help="hardest, easiest, middle or lo:hi (default hardest)")
    parser.set_defaults(func=_run)


if __name__ == "__main__":
    from analysis import run_script
    sys.exit(run_script(add_arguments, "Interactive HTML page of per-sample importance scores.",
                        "python -m analysis.scores"))
