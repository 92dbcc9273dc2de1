"""Importance scores: the per-sample maths, rank invariance under mpirun, scores.h5, and the explorer page."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain import checkpoint
from hpctrain.commands import score as score_command
from hpctrain.config import Config, DataConfig
from hpctrain.data import load_splits, scoring, shards
from hpctrain.data.filtering import select_kept
from hpctrain.errors import UserError
from hpctrain.models import build_model
from hpctrain.local_launch import run_cli, run_mpi

SMALL_MLP = ["--set", 'model.name="mlp"', "--set", "model.args={width=32, depth=1}", "--set", "batch.initial=128"]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scoring") / "digits"
    shards.shard("digits", out, shard_size=400)
    return out


def test_el2n_and_loss_match_their_definitions():
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 2])
    p = torch.softmax(logits.double(), 1)
    onehot = torch.eye(3, dtype=torch.float64)[labels]
    assert np.allclose(scoring.logit_scores("el2n", logits, labels), (p - onehot).norm(dim=1))
    assert np.allclose(scoring.logit_scores("loss", logits, labels), -torch.log(p[[0, 1], labels]))


def test_grand_closed_form_equals_autograd_last_layer_gradient_norm():
    torch.manual_seed(0)
    model = build_model("cnn1d", (40,), 10, {})
    x, y = torch.randn(6, 40), torch.randint(0, 10, (6,))
    with torch.no_grad():
        closed = scoring.logit_scores("grand", model(x), y, model.embed(x))
    for i in range(6):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        norm = torch.sqrt(model.head.weight.grad.pow(2).sum() + model.head.bias.grad.pow(2).sum())
        assert closed[i] == pytest.approx(float(norm), rel=1e-4)


def test_forgetting_counts_transitions_and_never_learned():
    history = np.array([[0, 1, 1, 0, 1],       # presentation 1
                        [1, 0, 1, 0, 1],
                        [0, 1, 1, 0, 0],
                        [1, 0, 1, 0, 1]], dtype=bool)
    assert scoring.forgetting_counts(history).tolist() == [1.0, 2.0, 0.0, 4.0, 1.0]


def test_density_measures():
    emb = np.array([[0.0, 0], [1, 0], [0, 1], [10, 10]])
    assert scoring.knn_distance(emb, 1).tolist() == [1.0, 1.0, 1.0, pytest.approx(np.hypot(9, 10))]
    assert scoring.centroid_distance(emb, np.array([0, 0, 1, 1])).tolist() == [0.5, 0.5] + [pytest.approx(np.hypot(5, 4.5))] * 2
    with pytest.raises(UserError, match="--k 4 must be between 1"):
        scoring.knn_distance(emb, 4)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_rank_blocks_cover_every_sample_once_in_order(size):
    parts = [scoring.rank_blocks(1000, 64, r, size) for r in range(size)]
    flat = [b for part in parts for b in part]
    assert flat == scoring.rank_blocks(1000, 64, 0, 1)              # the blocks never depend on size
    assert np.array_equal(np.concatenate([np.arange(lo, hi) for lo, hi in flat]), np.arange(1000))


def test_scores_file_merges_methods_and_replaces_other_samples(tmp_path, capsys):
    path, ids, labels = tmp_path / "scores.h5", np.array([5, 1, 3]), np.array([0, 1, 0])
    scoring.write_scores(path, ids, labels, {"loss": (np.array([0.5, 0.1, 0.3]), {"model": "m"})},
                         np.arange(6, dtype=np.float32).reshape(3, 2), {"model": "m"})
    scoring.write_scores(path, ids, labels, {"el2n": (np.array([5.0, 1, 3]), {"model": "n"})})
    stored = scoring.read_scores(path)
    assert stored.sample_ids.tolist() == [1, 3, 5] and stored.labels.tolist() == [1, 0, 0]
    assert stored.scores["loss"].tolist() == [0.1, 0.3, 0.5] and stored.scores["el2n"].tolist() == [1, 3, 5]
    assert stored.embedding.tolist() == [[2, 3], [4, 5], [0, 1]] and stored.attrs["el2n"]["model"] == "n"
    scoring.write_scores(path, np.array([7]), np.array([0]), {"el2n": (np.array([1.0]), {})})
    assert list(scoring.read_scores(path).scores) == ["el2n"] and "replaced" in capsys.readouterr().out
    with pytest.raises(UserError, match="has no 'grand' scores .it has: el2n.; compute them"):
        scoring.read_scores(path).method("grand")


@pytest.mark.parametrize("argv, message", [
    (["--method", "forgetting", "--checkpoint", "c.pt"], "forgetting records its own short training run"),
    (["--method", "el2n", "--extractor", "e.pt"], "--extractor is the embedding for --method feature-density"),
    (["--method", "el2n", "--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--method", "el2n", "--seeds", "0"], "--seeds 0 must be at least 1"),
    (["--method", "el2n", "--seeds", "3", "--checkpoint", "c.pt"], "--checkpoint is one model"),
    (["--method", "feature-density", "--extractor", "e.pt", "--seeds", "2"], "trains none; drop --seeds"),
])
def test_bad_argument_combinations(argv, message):
    parser = argparse.ArgumentParser()
    score_command.add_arguments(parser)
    with pytest.raises(UserError, match=message):
        score_command.options(parser.parse_args(["--data", "d"] + argv))


@pytest.mark.mpi
def test_scores_are_identical_on_one_and_four_ranks(digits_dir, engine):
    args = ["score", "--data", digits_dir, "--method", "loss,el2n,grand,forgetting,feature-density",
            "--epochs", "2"] + SMALL_MLP
    run_cli(args + ["--out", digits_dir / "one.h5"])
    proc = run_mpi(4, args + ["--out", digits_dir / "four.h5"], engine=engine)
    train = load_splits(DataConfig(name="digits")).train
    assert proc.stdout.count(f"wrote loss, el2n, grand, forgetting, feature-density scores of {len(train)} samples") == 1
    one, four = scoring.read_scores(digits_dir / "one.h5"), scoring.read_scores(digits_dir / "four.h5")
    assert np.array_equal(one.sample_ids, train.sample_ids)
    for method in scoring.METHODS:
        assert np.array_equal(one.scores[method], four.scores[method]), method
        assert one.attrs[method]["manifest_sha256"] == shards.manifest_hash(digits_dir)
    assert np.array_equal(one.embedding, four.embedding) and one.embedding.shape == (len(train), 32)
    assert one.scores["el2n"].std() > 0 and one.scores["forgetting"].max() >= 1    # not a constant


def test_seeds_average_the_scores_of_independent_short_runs(digits_dir, tmp_path):
    args = ["score", "--data", digits_dir, "--method", "el2n,forgetting", "--epochs", "1"] + SMALL_MLP
    for seed in (3, 4):
        run_cli(args + ["--set", f"run.seed={seed}", "--out", tmp_path / f"s{seed}.h5"])
    proc = run_cli(args + ["--set", "run.seed=3", "--seeds", "2", "--out", tmp_path / "mean.h5"])
    single = [scoring.read_scores(tmp_path / f"s{seed}.h5") for seed in (3, 4)]
    mean = scoring.read_scores(tmp_path / "mean.h5")
    assert "(mean of 2 runs)" in proc.stdout
    for method in ("el2n", "forgetting"):
        assert not np.array_equal(single[0].scores[method], single[1].scores[method])    # the seeds differ
        assert np.allclose(mean.scores[method], (single[0].scores[method] + single[1].scores[method]) / 2)
        assert mean.attrs[method]["seeds"].tolist() == [3, 4] and single[0].attrs[method]["seeds"].tolist() == [3]
    assert np.array_equal(mean.embedding, single[0].embedding)                  # the first run's


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_checkpoint_and_torchscript_extractor(digits_dir, tmp_path):
    cfg = Config()
    cfg.model.name, cfg.model.args = "mlp", {"width": 16, "depth": 1}
    torch.manual_seed(1)
    model = build_model("mlp", (64,), 10, cfg.model.args).eval()
    ckpt = checkpoint.save({"config": cfg.to_dict(), "model": model.state_dict()}, tmp_path, step=7, keep=1)
    extractor = torch.nn.Sequential(torch.nn.Linear(64, 3), torch.nn.Tanh()).eval()
    torch.jit.save(torch.jit.script(extractor), tmp_path / "extractor.pt")
    run_cli(["score", "--data", digits_dir, "--method", "loss,feature-density", "--checkpoint", ckpt,
             "--extractor", tmp_path / "extractor.pt", "--density", "centroid", "--out", tmp_path / "s.h5"])
    stored = scoring.read_scores(tmp_path / "s.h5")
    train = load_splits(DataConfig(name=str(digits_dir))).train
    x, y = train.get(np.arange(len(train)))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)).double(), torch.from_numpy(y), reduction="none")
        emb = extractor(torch.from_numpy(x)).numpy()
    assert np.allclose(stored.scores["loss"], loss.numpy(), rtol=1e-5)
    assert np.allclose(stored.scores["feature-density"], scoring.centroid_distance(emb, y), rtol=1e-5)
    assert stored.attrs["loss"]["step"] == 7 and str(ckpt) in stored.attrs["loss"]["model"]
    assert "extractor.pt" in stored.attrs["feature-density"]["model"] and stored.embedding.shape == (len(train), 3)


def _embedded_samples(page: str) -> dict:
    return json.loads(re.search(r'<script id="samples" type="application/json">(.*?)</script>', page, re.S).group(1))


@pytest.mark.parametrize("with_embedding", [True, False])
def test_score_explorer_page_holds_the_data(digits_dir, tmp_path, with_embedding):
    from hpctrain.analysis.scores import write_scores_report
    data = tmp_path / "d"
    shards.shard("digits", data, shard_size=500)
    train = load_splits(DataConfig(name=str(data))).train
    el2n = np.linspace(0, 1, len(train))
    scoring.write_scores(data / "scores.h5", train.sample_ids, train.labels,
                         {"el2n": (el2n, {"model": "mlp", "step": 3, "manifest_sha256": shards.manifest_hash(data)}),
                          "loss": (el2n[::-1].copy(), {"model": "mlp", "step": 3})},
                         np.random.default_rng(0).normal(size=(len(train), 4)) if with_embedding else None, {"model": "mlp"})
    write_scores_report(data, tmp_path / "page.html", keep_fraction=0.5)
    page = (tmp_path / "page.html").read_text()
    assert "Plotly.newPlot" in page and 'src="http' not in page              # plotly.js embedded: works offline
    assert "el2n: score distribution per class" in page and "loss: score distribution per class" in page
    assert ("embedding (mlp" in page) == with_embedding and ("inputs (no embedding stored)" in page) != with_embedding
    assert f"el2n: {len(select_kept(train.labels, el2n, 0.5, 'hardest'))} kept" in page
    samples = _embedded_samples(page)
    assert len(samples["id"]) == len(train)                          # fewer than MAX_POINTS: all shown
    where = np.searchsorted(train.sample_ids, samples["id"][:50])
    assert np.allclose(samples["x"][:50], train.get(where)[0], atol=1e-5)
    assert samples["label"][:50] == train.labels[where].tolist()


def small_extractor() -> torch.nn.Module:
    """A `module:factory` extractor for the test below."""
    return torch.nn.Sequential(torch.nn.Linear(64, 3), torch.nn.Tanh())


def test_export_and_factory_extractors_load(tmp_path):
    torch.manual_seed(2)
    reference = small_extractor().eval()
    x = torch.randn(7, 64)
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(reference, (x,), dynamic_shapes=({0: batch},)), tmp_path / "e.pt2")
    torch.save(reference.state_dict(), tmp_path / "state.pt")
    for spec, state in ((str(tmp_path / "e.pt2"), None), ("tests.test_scoring:small_extractor", str(tmp_path / "state.pt"))):
        embed, _ = scoring.load_extractor(spec, state, torch.device("cpu"))
        with torch.no_grad():
            assert torch.allclose(embed(x[:5]), reference(x[:5]))
    with pytest.raises(UserError, match="neither an existing TorchScript file nor module:factory"):
        scoring.load_extractor("missing.pt", None, torch.device("cpu"))
