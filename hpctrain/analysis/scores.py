"""The score explorer: one self-contained interactive HTML page about a scored shard directory.

    hpctrain report scores DATA_DIR --out scores.html [--keep-fraction 0.7 --keep hardest]
    python -m hpctrain.analysis.scores DATA_DIR --out scores.html [--keep-fraction 0.7 --keep hardest]

Per score method: histograms per class, and a 2-D PCA of the stored embedding (or of the
inputs, when no embedding was stored) coloured by score, with the samples the filter would
drop marked ×. The filter (score method, keep fraction, hardest/easiest/middle) is a set of
controls in the page: the per-class counts, the × marks and a `[data]` config snippet to copy
follow them. Hovering a point draws that sample (1-D trace or image); clicking pins it.
Plotly's JavaScript is embedded, so the page opens offline.

The page re-implements `hpctrain.data.filtering.select_kept` in JavaScript (it must run without
Python); tests/test_score_explorer.py checks in a headless Chromium that both keep the same samples.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from hpctrain.atomic import write_atomic
from hpctrain.data.filtering import KEEP_MODES, select_kept
from hpctrain.data.scoring import read_scores
from hpctrain.data.shards import manifest_hash, open_directory
from hpctrain.errors import UserError

MAX_POINTS = 3000        # samples shown in the scatter (and embedded for the viewer)
DEFAULT_KEEP_FRACTION = 0.7
DEFAULT_KEEP = "hardest"

# The page's behaviour. `select` mirrors hpctrain.data.filtering.select_kept for the three
# fraction modes: per class, rank by score (stable: ties keep their stored order), keep
# round-half-even(fraction * class size) from the hard end, the easy end or the middle.
_EXPLORER_JS = """
(function () {
  'use strict';
  var data, samples, perMethod = {}, classes = [], pinned = null, hovered = null, current = null;
  var $ = function (id) { return document.getElementById(id); };

  function roundHalfEven(v) {            // Python's round() on a float
    var f = Math.floor(v), d = v - f;
    return d > 0.5 ? f + 1 : d < 0.5 ? f : (f % 2 === 0 ? f : f + 1);
  }

  function ranks(scores) {               // rank of every sample within its class, easiest first
    var rank = new Int32Array(scores.length), byClass = {};
    data.labels.forEach(function (c, i) { (byClass[c] = byClass[c] || []).push(i); });
    classes.forEach(function (c) {
      byClass[c].slice().sort(function (a, b) { return scores[a] - scores[b] || a - b; })
                .forEach(function (i, r) { rank[i] = r; });
    });
    return {rank: rank, members: byClass};
  }

  function select(method, fraction, keep) {
    var r = perMethod[method] || (perMethod[method] = ranks(data.scores[method]));
    var kept = new Uint8Array(data.labels.length), rows = [], error = null;
    if (!(fraction > 0 && fraction <= 1))
      error = 'data.keep_fraction = ' + fraction + ' must be in (0, 1]; e.g. 0.7 keeps 70% of each class';
    if (KEEP_MODES.indexOf(keep) < 0) error = 'data.keep = ' + JSON.stringify(keep) + ': choose ' + KEEP_MODES.join(', ');
    classes.forEach(function (c) {
      var members = r.members[c], size = members.length, n = error ? 0 : roundHalfEven(fraction * size);
      if (!error && n === 0)
        error = 'data.keep_fraction = ' + fraction + ' keeps no sample of class ' + c + ' (' + size +
                ' samples); raise it to at least ' + Number((1 / size).toPrecision(3));
      var start = keep === 'easiest' ? 0 : keep === 'hardest' ? size - n : Math.floor((size - n) / 2);
      var lo = Infinity, hi = -Infinity, scores = data.scores[method];
      members.forEach(function (i) {
        if (r.rank[i] >= start && r.rank[i] < start + n) {
          kept[i] = 1; lo = Math.min(lo, scores[i]); hi = Math.max(hi, scores[i]);
        }
      });
      rows.push({label: c, total: size, kept: error ? 0 : n, lo: lo, hi: hi});
    });
    if (error) kept.fill(0);
    return {kept: kept, rows: rows, error: error};
  }

  function tomlNumber(v) { return Number.isInteger(v) ? v.toFixed(1) : String(v); }

  function snippet(s) {
    var lines = ['[data]', 'keep_fraction = ' + tomlNumber(s.fraction), 'score = ' + JSON.stringify(s.method),
                 'keep = ' + JSON.stringify(s.keep)];
    return s.error ? '# no valid selection: ' + s.error + '\\n' : '# ' + data.scores_note + '\\n' + lines.join('\\n') + '\\n';
  }

  function fmt(v) { return isFinite(v) ? Number(v.toPrecision(4)) : '–'; }

  function renderCounts(s) {             // classes as columns: a short table even with many classes
    var total = s.rows.reduce(function (a, row) { return [a[0] + row.total, a[1] + row.kept]; }, [0, 0]);
    var lines = [['class'].concat(s.rows.map(function (row) { return row.label; }), ['all']),
                 ['samples'].concat(s.rows.map(function (row) { return row.total; }), [total[0]]),
                 ['kept'].concat(s.rows.map(function (row) { return row.kept; }), [total[1]]),
                 ['dropped'].concat(s.rows.map(function (row) { return row.total - row.kept; }), [total[0] - total[1]]),
                 [s.method + ' kept'].concat(s.rows.map(function (row) { return fmt(row.lo) + '–' + fmt(row.hi); }), [''])];
    $('class-counts').innerHTML = lines.map(function (cells, r) {
      return '<tr>' + cells.map(function (v, k) { var tag = r === 0 || k === 0 ? 'th' : 'td';
                                                  return '<' + tag + '>' + v + '</' + tag + '>'; }).join('') + '</tr>';
    }).join('');
    $('selection-error').textContent = s.error || '';
  }

  function renderMarks(s) {
    var scatter = $('pca'), m = data.methods.indexOf(s.method);
    var symbols = data.shown.map(function (i) { return s.kept[i] ? 'circle' : 'x'; });
    Plotly.restyle(scatter, {visible: data.methods.map(function (_, k) { return k === m; })});
    Plotly.restyle(scatter, {'marker.symbol': [symbols]}, [m]);
  }

  function describe(j) {
    var i = data.shown[j], parts = ['sample_id ' + samples.id[j], 'label ' + samples.label[j]];
    data.methods.forEach(function (m) { parts.push(m + ' ' + fmt(data.scores[m][i])); });
    return parts.join(', ') + ' — ' + (current.kept[i] ? 'kept' : 'dropped') + ' by the current selection';
  }

  function drawSample() {
    var j = hovered !== null ? hovered : pinned, view = $('sample-view');
    if (j === null) return;
    var x = samples.x[j], image = Array.isArray(x[0]);
    var trace = image ? {z: x, type: 'heatmap', colorscale: 'Greys', reversescale: true}
                      : {y: x, type: 'scatter', mode: 'lines'};
    var title = describe(j) + (j === pinned ? ' (clicked)' : ' (hovered)');
    view.setAttribute('data-sample-id', samples.id[j]);
    view.setAttribute('data-title', title);
    Plotly.react(view, [trace], {title: {text: title, font: {size: 13}}, height: 320, margin: {t: 40},
                                 yaxis: image ? {autorange: 'reversed'} : {}});
  }

  function update() {
    var fraction = Number($('keep-fraction').value), keep = $('keep-strategy').value, method = $('score-method').value;
    current = select(method, fraction, keep);
    current.fraction = fraction; current.keep = keep; current.method = method;
    renderCounts(current);
    renderMarks(current);
    $('export').value = snippet(current);
    drawSample();
  }

  function setUp() {
    data = JSON.parse($('explorer-data').textContent);
    samples = JSON.parse($('samples').textContent);
    classes = Array.from(new Set(data.labels)).sort(function (a, b) { return a - b; });
    var fraction = $('keep-fraction'), slider = $('keep-fraction-slider');
    fraction.addEventListener('input', function () { slider.value = fraction.value; update(); });
    slider.addEventListener('input', function () { fraction.value = slider.value; update(); });
    $('keep-strategy').addEventListener('change', update);
    $('score-method').addEventListener('change', update);
    $('copy-export').addEventListener('click', function () {
      var text = $('export');
      text.select();
      (navigator.clipboard ? navigator.clipboard.writeText(text.value) : Promise.reject())
        .catch(function () { document.execCommand('copy'); });
    });
    var scatter = $('pca');
    scatter.on('plotly_hover', function (ev) { hovered = ev.points[0].pointNumber; drawSample(); });
    scatter.on('plotly_unhover', function () { hovered = null; drawSample(); });
    scatter.on('plotly_click', function (ev) { pinned = ev.points[0].pointNumber; hovered = null; drawSample(); });
    update();
    window.scoreExplorer = {
      select: select, update: update,
      state: function () { return current; },
      kept: function () { return Array.from(current.kept.keys()).filter(function (i) { return current.kept[i]; }); }
    };
  }
  var KEEP_MODES = KEEP_MODES_JSON;
  window.addEventListener('load', setUp);
})();
""".replace("KEEP_MODES_JSON", json.dumps(list(KEEP_MODES)))

_STYLE = """
body{font-family:sans-serif;margin:2em;max-width:1400px} td,th{border:1px solid #ccc;padding:4px 8px}
table{border-collapse:collapse} #controls{display:flex;flex-wrap:wrap;gap:0 2em;background:#f6f6f6;padding:0 1em}
#controls h3{margin:0.6em 0 0.3em} #controls label{display:block;margin:0.3em 0} #selection-error{color:#b00}
#counts{max-width:100%;overflow-x:auto} #class-counts td{text-align:right} #export{font-family:monospace;width:36em}
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


def _scatter(xy: np.ndarray, shown: np.ndarray, stored, kept: dict[str, np.ndarray], basis: str) -> go.Figure:
    """One trace per method (the page's method control shows one); symbols mark kept/dropped.

    SVG rather than WebGL, so the page draws in browsers (and headless test runs) without a GPU."""
    ids, labels = stored.sample_ids[shown], stored.labels[shown]
    traces = []
    for m, (method, scores) in enumerate(stored.scores.items()):
        score = scores[shown]
        traces.append(go.Scatter(
            x=xy[:, 0], y=xy[:, 1], mode="markers", visible=m == 0, name=method,
            marker=dict(color=score, colorscale="Viridis", size=6, colorbar=dict(title=method),
                        symbol=np.where(kept[method][shown], "circle", "x").tolist()),
            text=[f"sample_id {i}<br>label {c}<br>{method} {s:.4g}" for i, c, s in zip(ids, labels, score)],
            hoverinfo="text"))
    fig = go.Figure(traces)
    fig.update_layout(title=f"PCA of the {basis}<br>colour = score, × = dropped by the selection above "
                            f"(hover over a point to see the sample, click to pin it)", height=560,
                      xaxis_title="PC 1", yaxis_title="PC 2", showlegend=False)
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


def _controls(methods: list[str], keep_fraction: float, keep: str) -> str:
    """The selection controls, the per-class counts and the config snippet (filled in by the page's JS)."""
    method_options = "".join(f"<option>{html.escape(m)}</option>" for m in methods)
    keep_options = "".join(f"<option{' selected' if k == keep else ''}>{k}</option>" for k in KEEP_MODES)
    return f"""<div id="controls">
<div><h3>Selection</h3>
<label>score method <select id="score-method">{method_options}</select></label>
<label>keep fraction <input id="keep-fraction" type="number" min="0" max="1" step="0.01" value="{float(keep_fraction)!r}">
<input id="keep-fraction-slider" type="range" min="0.01" max="1" step="0.01" value="{float(keep_fraction)!r}"></label>
<label>keep <select id="keep-strategy">{keep_options}</select></label>
<p id="selection-error"></p></div>
<div><h3>Config for <code>hpctrain train</code></h3>
<textarea id="export" rows="6" wrap="off" readonly></textarea><br><button id="copy-export">copy</button></div>
<div id="counts"><h3>Per class</h3><table id="class-counts"></table></div>
</div>"""


def write_scores_report(data_dir: Path, out: Path, keep_fraction: float | None = None,
                        keep: str | None = None) -> None:
    """Write the score explorer page for the shard directory `data_dir` (its scores.h5) to `out`.

    `keep_fraction` and `keep` are the selection the page opens with (default 0.7, hardest)."""
    keep_fraction = DEFAULT_KEEP_FRACTION if keep_fraction is None else keep_fraction
    keep = keep or DEFAULT_KEEP
    if keep not in KEEP_MODES:
        raise UserError(f"--keep {keep!r}: the explorer selects {', '.join(KEEP_MODES)}")
    data_dir, out = Path(data_dir), Path(out)
    stored = read_scores(data_dir / "scores.h5")
    if not stored.scores:
        raise UserError(f"{data_dir / 'scores.h5'} holds no scores; run `hpctrain score --data {data_dir} --method el2n`")
    directory = open_directory(data_dir)
    by_id = np.argsort(directory.sample_ids, kind="stable")
    where = by_id[np.searchsorted(directory.sample_ids[by_id], stored.sample_ids).clip(0, len(by_id) - 1)]
    if not np.array_equal(directory.sample_ids[where], stored.sample_ids):
        raise UserError(f"{data_dir / 'scores.h5'} scores samples that are not in {data_dir}; re-run `hpctrain score`")
    kept = {m: np.isin(np.arange(len(s)), select_kept(stored.labels, s, keep_fraction, keep))
            for m, s in stored.scores.items()}        # also checks the fraction before the page is built

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
    scatter = _scatter(xy, shown, stored, kept, basis).to_html(full_html=False, include_plotlyjs=True, div_id="pca")
    histograms = [fig.to_html(full_html=False, include_plotlyjs=False) for fig in figures]
    samples = {"id": stored.sample_ids[shown].tolist(), "label": stored.labels[shown].tolist(),
               "x": np.round(_viewable(x), 5).tolist()}
    explorer = {"methods": list(stored.scores), "labels": stored.labels.tolist(), "shown": shown.tolist(),
                "scores": {m: np.asarray(s, dtype=np.float64).tolist() for m, s in stored.scores.items()},
                "scores_note": f"with data.name = {json.dumps(str(data_dir))} (its scores.h5)"}
    counts = ", ".join(f"{m}: {int(k.sum())} kept" for m, k in kept.items())
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>scores of {html.escape(str(data_dir))}</title>
<style>{_STYLE}</style></head><body>
<h1>Importance scores of {html.escape(str(data_dir))}</h1>
<p>{n} training samples, {len(np.unique(stored.labels))} classes; the page opened with keep {html.escape(keep)}
{keep_fraction:g} ({html.escape(counts)}); scatter shows {len(shown)} samples.</p>
{_provenance_table(stored, manifest_hash(data_dir))}
<h2>Which samples a filter keeps</h2>
{_controls(list(stored.scores), keep_fraction, keep)}
{scatter}
<div id="sample-view"><p>Hover over a point in the PCA plot to see the sample; click to pin it.</p></div>
<h2>Score distributions</h2>
{''.join(histograms)}
<script id="samples" type="application/json">{json.dumps(samples)}</script>
<script id="explorer-data" type="application/json">{json.dumps(explorer)}</script>
<script>{_EXPLORER_JS}</script>
</body></html>
"""
    write_atomic(out, page)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """--keep-fraction/--keep, shared by `hpctrain report scores` and `python -m hpctrain.analysis.scores`."""
    parser.add_argument("--keep-fraction", type=float, default=None, metavar="F",
                        help=f"selection the score page opens with: fraction kept per class (default {DEFAULT_KEEP_FRACTION})")
    parser.add_argument("--keep", choices=KEEP_MODES, default=None,
                        help=f"selection the score page opens with: which samples (default {DEFAULT_KEEP})")


def _run(args: argparse.Namespace) -> None:
    write_scores_report(args.data_dir, args.out, args.keep_fraction, args.keep)
    print(f"wrote {args.out}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, help="shard directory with scores.h5 (from `hpctrain score`)")
    parser.add_argument("--out", type=Path, default=Path("scores.html"), help="HTML file (default scores.html)")
    add_selection_arguments(parser)
    parser.set_defaults(func=_run)


DESCRIPTION = "Interactive HTML page of per-sample importance scores."


def main(argv: Sequence[str] | None = None, prog: str = "python -m hpctrain.analysis.scores") -> int:
    """`python -m hpctrain.analysis.scores` (or the checkout's `python -m analysis.scores`)."""
    from hpctrain.analysis import run_script
    return run_script(add_arguments, DESCRIPTION, prog, argv)


if __name__ == "__main__":
    sys.exit(main())
