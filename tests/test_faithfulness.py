"""Mean-ablation faithfulness: the exact end points, hooks equal weight edits, curves and summaries."""

import csv
import json

import pytest
import torch

from ctsft_lens.batching import encode
from ctsft_lens.circuit import Circuit, Edge, rank_heads
from ctsft_lens.forward import attn_results
from ctsft_lens.masks import random_mask
from ctsft_lens.means import head_means
from ctsft_lens.faithfulness import (
    MeanAblation, ablation_hooks, area, depth_curve, faithfulness_report, logit_diff, random_band,
    size_grid, topk_curve,
)
from ctsft_lens.models import model_info, tiny_model
from ctsft_lens.tasks import load_task

N_LAYERS, N_HEADS = 2, 4


@pytest.fixture(scope="module")
def examples():
    return load_task("nusax-senti", "indonesian").sample(6, "train", seed=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=2, d_model=32)


@pytest.fixture(scope="module")
def ab(model, examples):
    return MeanAblation(model, examples, progress=False)


def hand_circuit(info) -> Circuit:
    scores = torch.tensor([[0.1, -2.0, 0.3, 0.05], [1.5, 0.0, -0.7, 0.2]])  # unscored heads: see the top-k NaN test
    return Circuit((((0, 1), (1, 0)), ((1, 2),)), (scores, scores), (Edge((0, 1), None, 0, -2.0),
                   Edge((1, 0), None, 0, 1.5), Edge((1, 2), (1, 0), 1, -0.7)), "projection", 0.2, info)


def test_logit_diff_is_gold_minus_mean_of_other_labels():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 4.0]])
    assert logit_diff(logits, torch.tensor([0, 1])).tolist() == [2.5, 0.0]


def test_references_are_the_unhooked_model_and_the_all_means_model(ab, model, examples):
    """m(full) is a plain forward; m(empty) is a forward with every head replaced by its mean."""
    batch = encode(model, examples)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1][:, batch.label_token_ids].double()
    assert ab.full.logit_diff == pytest.approx(float(logit_diff(logits, batch.labels).mean()), abs=1e-5)
    assert ab.empty.logit_diff != pytest.approx(ab.full.logit_diff, abs=1e-4)


def test_per_head_results_are_scoped_to_the_ablation(model, examples):
    """Mean ablation turns per-head results on for its own forwards only (training never pays)."""
    assert not model.cfg.use_attn_result
    ab = MeanAblation(model, examples, progress=False)
    assert not model.cfg.use_attn_result
    keep = ab.table(True)
    keep[0, 0] = False
    assert ab.metrics(keep).logit_diff != pytest.approx(ab.full.logit_diff, abs=1e-7)  # the hook fired


def test_a_custom_metric_is_used_for_every_curve(model, examples):
    prob = lambda logits, labels: logits.softmax(-1).gather(-1, labels[:, None])[:, 0]  # noqa: E731
    ab = MeanAblation(model, examples, metric=prob, progress=False)
    assert 0 < ab.full.logit_diff < 1 and 0 < ab.empty.logit_diff < 1  # probabilities, not logit gaps


def test_ablation_changes_the_output(ab):
    keep = ab.table(True)
    keep[1, 2] = False
    assert ab.metrics(keep).logit_diff != pytest.approx(ab.full.logit_diff, abs=1e-7)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_hooks_equal_editing_the_output_weights(arch, examples):
    """W_O slice of each ablated head set to zero and its mean added to the output bias."""
    model = tiny_model(arch, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=2, d_model=32)
    means = head_means(model, examples, positions="last")
    keep = torch.ones(N_LAYERS, N_HEADS, dtype=torch.bool)
    keep[0, 1] = keep[0, 3] = keep[1, 0] = False
    batch = encode(model, examples)
    inp, kw = batch.input_ids, {"attention_mask": batch.attention_mask}
    with torch.no_grad():
        full = model(inp, **kw)
        with attn_results(model), model.hooks(fwd_hooks=ablation_hooks(means, keep)):
            hooked = model(inp, **kw)
        d_head = 32 // N_HEADS
        for layer in range(N_LAYERS):
            hf_layer = (model.original_model.model.layers[layer].self_attn.o_proj if arch == "qwen2"
                        else model.original_model.transformer.h[layer].attn.c_proj)
            o = getattr(hf_layer, "original_component", hf_layer)
            if o.bias is None:  # Qwen2's o_proj has no bias: give it one
                o.bias = torch.nn.Parameter(torch.zeros(32))
            for head in range(N_HEADS):
                if not keep[layer, head]:
                    cols = slice(head * d_head, (head + 1) * d_head)
                    if arch == "qwen2":  # nn.Linear: weight [out, in]
                        o.weight[:, cols] = 0
                    else:  # Conv1D: weight [in, out]
                        o.weight[cols, :] = 0
                    o.bias += means[layer, head]
        edited = model(inp, **kw)
    mask = batch.attention_mask.bool()
    assert (hooked - full)[mask].abs().max() > 1e-3  # the ablation does something
    assert torch.allclose(hooked[mask], edited[mask], atol=1e-5)


def test_several_tables_per_forward_match_one_at_a_time(model, examples):
    one = MeanAblation(model, examples, progress=False)
    three = MeanAblation(model, examples, means=one.means, tables_per_forward=3, progress=False)
    keeps = torch.rand(4, N_LAYERS, N_HEADS, generator=torch.Generator().manual_seed(0)) > 0.5
    for a, b in zip(one.metrics_many(keeps), three.metrics_many(keeps)):
        assert a.logit_diff == pytest.approx(b.logit_diff, abs=1e-5) and a.accuracy == b.accuracy


def test_positions_option_changes_the_means(model, examples, ab):
    last = MeanAblation(model, examples, positions="last", progress=False)
    assert last.positions == "last" and not torch.allclose(last.means, ab.means)


def test_area_is_mibs_trapezoid_over_normalized_size():
    assert area([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)
    assert area([0, 2, 4], [1, 1, 1]) == pytest.approx(1.0)  # x divided by its last value


def test_topk_curve_ranks_with_rank_heads_and_skips_unscored_heads(ab):
    scores = torch.full((N_LAYERS, N_HEADS), float("nan"))
    scores[1, 2], scores[0, 1], scores[1, 0] = 3.0, 2.0, -1.0
    curve = topk_curve(ab, scores, [1, 2, 3, 4, 10])
    assert [p.size for p in curve.points] == [1, 2, 3]  # only 3 heads have a score
    assert curve.points[0].logit_diff == pytest.approx(ab.metrics(ab.table([(1, 2)])).logit_diff)


def test_depth_curve_has_one_point_per_depth_in_both_directions(ab, model):
    c = hand_circuit(model_info(model, checksum=False))
    curve = depth_curve(ab, c)
    assert [p.depth for p in curve.points] == [0, 1] and [p.size for p in curve.points] == [2, 3]
    last = ab.evaluate(c)
    assert curve.points[-1].faithfulness == pytest.approx(last.sufficiency)
    assert curve.points[-1].necessity == pytest.approx(last.necessity)
    # end points f(0 heads) = 0 and f(all 8) = 1 are exact, so they anchor the area
    xs = [0.0] + [p.fraction for p in curve.points] + [1.0]
    ys = [0.0] + [p.faithfulness for p in curve.points] + [1.0]
    assert curve.cpr == pytest.approx(area(xs, ys))
    assert curve.cmd == pytest.approx(area(xs, [abs(1 - y) for y in ys]))
    assert curve.cmd >= abs(1 - curve.cpr) - 1e-9


def test_topk_curve_and_random_band(ab, model):
    c = hand_circuit(model_info(model, checksum=False))
    sizes = [1, 2, 4, 8]
    curve = topk_curve(ab, c.scores[0], sizes)
    assert [p.size for p in curve.points] == sizes
    assert curve.points[-1].faithfulness == pytest.approx(1.0)  # top-8 of 8 heads is everything
    first = ab.metrics(ab.table([rank_heads(c.scores[0])[0]]))
    assert curve.points[0].logit_diff == pytest.approx(first.logit_diff)
    band = random_band(ab, sizes, seeds=(0, 1, 2))
    assert len(band.values) == 4 and all(len(v) == 3 for v in band.values)
    assert band.mean[-1] == pytest.approx(1.0) and band.std[-1] == pytest.approx(0.0, abs=1e-9)
    info = {"n_layers": N_LAYERS, "n_heads": N_HEADS}
    expect = ab.faithfulness(ab.metrics(ab.table(random_mask(info, 2, seed=1))))
    assert band.values[1][1] == pytest.approx(expect)  # the same draw as the trainer's control
    per_seed = [area([0.0] + [k / 8 for k in sizes], [0.0] + [v[i] for v in band.values]) for i in range(3)]
    assert band.cpr[0] == pytest.approx(sum(per_seed) / 3)
    assert all(lo <= m <= hi for lo, m, hi in zip(band.low, band.mean, band.high))


def test_size_grid_is_sorted_unique_and_ends_at_the_top():
    grid = size_grid(336, points=24)
    assert grid == sorted(set(grid)) and grid[0] == 1 and grid[-1] == 336
    assert size_grid(336, max_size=40)[-1] == 40
    for points, top in ((4, 68), (24, 336), (6, 3), (10, 32)):
        grid = size_grid(336, points=points, max_size=top)
        assert len(grid) >= min(points, top) and grid[0] == 1 and grid[-1] == top


def test_report_serializes_to_json_and_csv(tmp_path, model, examples):
    info = model_info(model, checksum=False)
    c = hand_circuit(info)
    report = faithfulness_report(model, {"projection": c, "magnitude": c}, examples, positions="last",
                                 sizes=[1, 4, 8], seeds=(0, 1), progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["positions"] == "last" and set(data["depth_curves"]) == {"projection", "magnitude"}
    band = sorted({1, 4, 8} | {p.size for p in report.depth["projection"].points})  # the depths' own sizes too
    assert data["random"]["seeds"] == [0, 1] and data["random"]["sizes"] == band
    rows = list(csv.DictReader(open(report.write_csv(tmp_path / "curves.csv"))))
    assert len(rows) == 2 * 2 + 2 * 3 + 2 * len(band)  # depth points + top-k points + random points
    assert "CPR" in report.summary() and "necessity" in report.summary()


def test_cli_writes_curves_and_figures_and_refuses_a_mismatched_circuit(tmp_path, capsys):
    from ctsft_lens.circuit import save_circuit
    from ctsft_lens.cli import main

    info = {"name": "tiny-qwen2", "n_layers": 4, "n_heads": 8}  # load_model("tiny") is 4 x 8
    scores = torch.linspace(-1, 1, 32).view(4, 8)
    c = Circuit((((3, 1),), ((1, 2),)), (scores, scores), (Edge((3, 1), None, 0, 0.9), Edge((1, 2), (3, 1), 1, 0.3)),
                "magnitude", 0.05, info)
    save_circuit(c, tmp_path / "c.json")
    args = ["faithfulness", "--model", "tiny", "--circuit", str(tmp_path / "c.json"), "--n-examples", "3",
            "--seeds", "1", "--points", "2", "--positions", "last", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    out = tmp_path / "out"
    data = json.loads((out / "faithfulness.json").read_text())
    assert data["positions"] == "last" and data["circuits"]["magnitude"]["size"] == 2
    assert data["circuit_files"] == {"magnitude": str(tmp_path / "c.json")}
    assert len(data["depth_curves"]["magnitude"]["points"]) == 2
    assert (out / "curves.csv").exists() and (out / "plotly.min.js").exists()
    assert {p.name for p in out.glob("*.html")} == {"faithfulness.html", "relevance.html", "circuit_magnitude.html"}
    save_circuit(Circuit((((20, 1),),), (torch.zeros(24, 14),), (), "projection", 0.02,
                         {"name": "Qwen/Qwen2.5-0.5B", "n_layers": 24, "n_heads": 14}), tmp_path / "big.json")
    args[args.index(str(tmp_path / "c.json"))] = str(tmp_path / "big.json")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "big.json" in err[0] and "n_layers: mask 24 vs model 4" in err[0]


def test_circuits_from_discover_round_trip_and_get_curves(tmp_path, model, examples):
    from ctsft_lens import discover
    from ctsft_lens.circuit import load_circuit, save_circuit

    found = {s: load_circuit(save_circuit(discover(model, examples, scoring=s, ratio=0.25, max_depth=1,
                                                   progress=False), tmp_path / f"{s}.json"))
             for s in ("projection", "magnitude")}
    report = faithfulness_report(model, found, examples, sizes=[2, 8], seeds=(0,), progress=False)
    for name, c in found.items():
        curve = report.depth[name]
        assert [p.size for p in curve.points] == [len(c.up_to_depth(d).heads) for d in range(c.depth + 1)]
        assert report.circuits[name].size == len(c.heads)
        assert report.topk[name].points[-1].faithfulness == pytest.approx(1.0)


def test_depth_circuits_are_compared_with_random_circuits_of_their_own_size(tiny_qwen, indonesian):
    """Issue #41: a depth curve's CPR is mostly its anchored line to all heads; the fair check is
    each depth against the random band at the same size, which the band now always measures."""
    from ctsft_lens import discover
    from ctsft_lens.faithfulness import faithfulness_report

    examples = indonesian.sample(6, seed=0)
    circuit = discover(tiny_qwen, examples, ratio=0.1, max_depth=1, progress=False)
    report = faithfulness_report(tiny_qwen, {"cdt": circuit}, examples, sizes=[1, 16], seeds=(0, 1, 2),
                                 progress=False)
    rows = report.depth_vs_random()["cdt"]
    assert [r["size"] for r in rows] == [p.size for p in report.depth["cdt"].points]  # sizes outside the grid too
    band = dict(zip(report.random.sizes, report.random.mean))
    for r in rows:
        assert r["random_mean"] == band[r["size"]]
        if r["random_sd"] > 0:
            assert r["sd_above"] == pytest.approx((r["faithfulness"] - r["random_mean"]) / r["random_sd"])
    assert "against random circuits of the same size" in report.summary()
    assert report.to_dict()["depth_vs_random"]["cdt"] == rows
