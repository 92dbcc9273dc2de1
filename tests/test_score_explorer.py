"""The score explorer page in a real headless Chromium: its selection controls keep exactly the
samples `hpctrain.data.filtering.select_kept` keeps, the per-class counts, × marks and the `[data]`
snippet follow the controls, and the sample view follows the mouse."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from hpctrain.config import DataConfig, config_from_dict
from hpctrain.data import load_splits, scoring, shards
from hpctrain.data.filtering import select_kept
from hpctrain.errors import UserError
from tests.chromium import chromium, run_page  # noqa: F401  (chromium is a fixture)
from hpctrain.local_launch import run_cli

# What the page opens with (from the command line), then what the test sets through the controls.
INITIAL = (0.4, "easiest")
SCENARIOS = [  # (control that sets the fraction, fraction, keep, method)
    ("keep-fraction", 0.5, "hardest", "el2n"),         # odd class sizes: x.5 rounds half to even
    ("keep-fraction-slider", 0.25, "middle", "loss"),
    ("keep-fraction", 0.9, "easiest", "loss"),
    ("keep-fraction", 1, "middle", "el2n"),
    ("keep-fraction", 0.001, "hardest", "el2n"),       # keeps no sample of a class: an error, as in training
]

DRIVE = """
var E = window.scoreExplorer, gd = document.getElementById('pca'), results = [];
var methods = Array.from(document.getElementById('score-method').options).map(function (o) { return o.value; });
function set(id, value, event) {
  var el = document.getElementById(id); el.value = value; el.dispatchEvent(new Event(event));
}
function read() {
  var s = E.state(), m = methods.indexOf(s.method);
  return {method: s.method, fraction: s.fraction, keep: s.keep, kept: E.kept(),
          counts: Array.from(document.querySelectorAll('#class-counts tr')).slice(0, 4).map(function (tr) {
            return Array.from(tr.cells).map(function (td) { return td.textContent; }); }),
          exported: document.getElementById('export').value,
          error: document.getElementById('selection-error').textContent,
          symbols: gd.data[m].marker.symbol, visible: gd.data.map(function (t) { return t.visible; })};
}
results.push(read());
SCENARIOS.forEach(function (s) {
  set(s[0], s[1], 'input'); set('keep-strategy', s[2], 'change'); set('score-method', s[3], 'change');
  results.push(read());
});
set('keep-fraction', 0.5, 'input'); set('keep-strategy', 'hardest', 'change'); set('score-method', 'el2n', 'change');

// The mouse: hover a point, click another, hover a third, leave the plot.
var trace = gd._fullData[methods.indexOf('el2n')], xs = Array.from(trace.x), ys = Array.from(trace.y);
var points = [xs.indexOf(Math.min.apply(null, xs)), xs.indexOf(Math.max.apply(null, xs)),
              ys.indexOf(Math.max.apply(null, ys))];
var drag = gd.querySelector('.nsewdrag'), box = drag.getBoundingClientRect(), xa = gd._fullLayout.xaxis,
    ya = gd._fullLayout.yaxis;
function mouse(type, j, target) {
  var x = j === null ? box.left - 50 : box.left + xa.l2p(xs[j]), y = j === null ? box.top - 50 : box.top + ya.l2p(ys[j]);
  (target || drag).dispatchEvent(new MouseEvent(type, {clientX: x, clientY: y, bubbles: true, buttons: type === 'mousedown' ? 1 : 0}));
}
function view() { return document.getElementById('sample-view').getAttribute('data-title') || ''; }
var seen = [], steps = [
  function () { mouse('mousemove', points[0]); },
  function () { seen.push(view()); mouse('mousemove', points[1]); },
  function () { mouse('mousedown', points[1]); mouse('mouseup', points[1], document); },
  function () { seen.push(view()); mouse('mousemove', points[2]); },
  function () { seen.push(view()); mouse('mouseout', null); drag.dispatchEvent(new MouseEvent('mouseout', {bubbles: true})); },
  function () { seen.push(view());
    window.testResult(JSON.stringify({results: results, points: points, seen: seen})); }
];
(function next(k) { if (k < steps.length) { steps[k](); setTimeout(function () { next(k + 1); }, 300); } })(0);
"""


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, scoring.ScoresFile]:
    """The digits shards with two score methods full of ties (rounded), as `hpctrain score` writes them."""
    data = tmp_path_factory.mktemp("explorer") / "digits"
    shards.shard("digits", data, shard_size=500)
    train = load_splits(DataConfig(name=str(data))).train
    rng = np.random.default_rng(5)
    scoring.write_scores(data / "scores.h5", train.sample_ids, train.labels,
                         {"el2n": (rng.random(len(train)).round(2), {"model": "mlp", "step": 3}),
                          "loss": (rng.exponential(size=len(train)).round(1), {"model": "mlp", "step": 3})})
    return data, scoring.read_scores(data / "scores.h5")


def python_error(labels: np.ndarray, scores: np.ndarray, fraction: float, keep: str) -> str:
    with pytest.raises(UserError) as info:
        select_kept(labels, scores, fraction, keep)
    return str(info.value)


def test_page_controls_select_what_training_keeps(chromium, scored, tmp_path):  # noqa: F811
    data, stored = scored
    page = tmp_path / "scores.html"
    run_cli(["report", "scores", data, "--out", page, "--keep-fraction", INITIAL[0], "--keep", INITIAL[1]])
    shown = np.array(json.loads(page.read_text().split('<script id="explorer-data" type="application/json">')[1]
                                .split("</script>")[0])["shown"])
    out = json.loads(run_page(chromium, page, f"var SCENARIOS = {json.dumps(SCENARIOS)};\n{DRIVE}"))

    expected = [("keep-fraction", *INITIAL, "el2n"), *SCENARIOS]
    assert len(out["results"]) == len(expected)
    classes, sizes = np.unique(stored.labels, return_counts=True)
    for got, (_, fraction, keep, method) in zip(out["results"], expected):
        assert (got["fraction"], got["keep"], got["method"]) == (fraction, keep, method)
        assert got["visible"] == [m == method for m in stored.scores]
        scores = stored.scores[method]
        if fraction < 0.01:
            assert got["error"] == python_error(stored.labels, scores, fraction, keep)
            assert got["exported"].startswith("# no valid selection") and got["kept"] == []
            continue
        kept = select_kept(stored.labels, scores, fraction, keep)
        assert got["kept"] == kept.tolist(), (fraction, keep, method)
        per_class = np.bincount(stored.labels[kept], minlength=len(classes))
        assert got["counts"] == [[head, *map(str, [*values, total])] for head, values, total in (
            ("class", classes, "all"), ("samples", sizes, len(scores)), ("kept", per_class, len(kept)),
            ("dropped", sizes - per_class, len(scores) - len(kept)))]
        marked = np.isin(shown, kept)
        assert got["symbols"] == np.where(marked, "circle", "x").tolist()
        cfg = config_from_dict(tomllib.loads(got["exported"]))
        assert (cfg.data.keep_fraction, cfg.data.keep, cfg.data.score) == (fraction, keep, method)
        assert got["error"] == ""

    # hovered → that sample; clicked → pinned; hover elsewhere → that one; leave the plot → the pinned one
    ids = [stored.sample_ids[shown[j]] for j in out["points"]]
    hovered, clicked, other, after = out["seen"]
    assert hovered.startswith(f"sample_id {ids[0]},") and hovered.endswith("(hovered)")
    assert clicked.startswith(f"sample_id {ids[1]},") and clicked.endswith("(clicked)")
    assert other.startswith(f"sample_id {ids[2]},") and other.endswith("(hovered)")
    assert after == clicked
