"""``ctsft compare``, MIB's faithfulness protocol, and the EAP-IG / MIB export of unscored heads."""

import dataclasses
import json
import math

import pytest
import torch

from ctsft_lens.cli import main


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(6, seed=0)


def test_compare_png_without_kaleido_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kaleido" else real(name, *a))
    rc = main(["compare", "--model", "tiny", "--method", "attribution", "--png", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "kaleido" in err[0]
    assert not (tmp_path / "c").exists()


def test_compare_command_on_the_tiny_model(tmp_path, capsys):
    rc = main(["compare", "--model", "tiny", "--method", "attribution", "--method", "patching",
               "--n-discovery", "3", "--n-eval", "6", "--points", "4", "--seeds", "2", "--n-boot", "50",
               "--heads-per-forward", "32", "--plotlyjs", "cdn", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert list(data["methods"]) == ["attribution", "patching"] and data["n_evaluation"] == 6
    for name, m in data["methods"].items():
        assert m["seconds"] > 0 and m["forward_equivalents"] > 0
        assert len(m["cpr_ci"]) == 2 and m["mib"] is None
        assert data["spearman"][name][name] == pytest.approx(1.0)
    assert data["methods"]["attribution"]["cpr_diff_vs_first"] is None
    per = torch.tensor(data["methods"]["attribution"]["scores_per_example"])  # rows: the discovery uids
    assert per.shape[0] == 3 == len(data["meta"]["discovery_uids"])
    assert torch.allclose(per.mean(0), torch.tensor(data["methods"]["attribution"]["scores"]), atol=1e-6)
    assert data["methods"]["patching"]["cpr_diff_ci"] is not None
    table = (tmp_path / "compare.md").read_text()
    assert "| attribution |" in table and "random (2 seeds)" in table and "Spearman" in table
    assert "cdn.plot.ly" in (tmp_path / "compare.html").read_text()[:5000]
    assert "CPR" in capsys.readouterr().out
    # read back: the same figures, table and figure as the run wrote (e.g. to redraw it later)
    from ctsft_lens.compare import load_comparison
    from ctsft_lens.plots import plot_comparison
    from ctsft_lens.errors import CtsftError

    again = load_comparison(tmp_path / "compare.json")
    back = json.loads(json.dumps(again.to_dict()))
    assert back == {k: data[k] for k in back}  # the CLI adds the run's settings (model, task, ...) beside them
    assert again.table() in table
    fig = plot_comparison(again)
    cost_axis = fig.layout.xaxis2
    lo, hi = cost_axis.range  # log10 units: half a decade of room either side for the names
    costs = [m["forward_equivalents"] for m in data["methods"].values()]
    assert lo == pytest.approx(math.log10(min(costs)) - 0.5) and hi == pytest.approx(math.log10(max(costs)) + 0.5)
    (tmp_path / "bad.json").write_text('{"methods": {}}')
    with pytest.raises(CtsftError, match="not a compare.json"):
        load_comparison(tmp_path / "bad.json")


def test_compare_curves_are_the_faithfulness_curves(tiny_qwen, indonesian):
    """Same top-k curve as faithfulness.topk_curve; bootstrap intervals bracket the estimate.

    Compared EXACTLY (same batches), not within a float32 tolerance: the reference MeanAblation is
    built on the examples in compare's own order (``by_length``) with compare's evaluation batch
    size, so every forward (means, full / empty references, each top-k table) is the same float32
    computation on the same padded batch. Only the float64 reductions over examples differ in order
    (compare averages per-example metrics, ``metrics_many`` sums per batch), hence ``rel=1e-9``.
    Built on file order instead, the padding differs and CMD moved by 2.4e-5 relative on one CPU's
    BLAS: the ratio f = (d - empty) / (full - empty) amplifies float32 rounding of the logits."""
    from ctsft_lens.batching import by_length
    from ctsft_lens.compare import compare_methods
    from ctsft_lens.faithfulness import MeanAblation, random_band, topk_curve

    discovery, evaluation = indonesian.sample(6, seed=0), indonesian.sample(9, "valid", seed=1)
    sizes = [1, 2, 4, 8, 16]
    c = compare_methods(tiny_qwen, discovery, evaluation, ["projection", "attribution"], sizes=sizes, seeds=(0, 1),
                        n_boot=200, eval_batch_size=32, progress=False)
    ab = MeanAblation(tiny_qwen, by_length(tiny_qwen, evaluation), batch_size=32, progress=False)
    assert (ab.full, ab.empty) == (c.full, c.empty)  # the same batches: the references agree to the bit
    for r in c.methods.values():
        ref = topk_curve(ab, r.scores, sizes)
        assert [p.size for p in r.curve.points] == sizes
        assert r.curve.cpr == pytest.approx(ref.cpr, rel=1e-9) and r.curve.cmd == pytest.approx(ref.cmd, rel=1e-9)
        assert r.cpr_ci[0] <= r.cpr_ci[1] and r.cmd_ci[0] <= r.cmd_ci[1]
    assert c.random.cpr == random_band(ab, sizes, (0, 1)).cpr  # the same draws on the same batches
    assert c.methods["attribution"].cpr_diff == pytest.approx(
        c.methods["attribution"].curve.cpr - c.methods["projection"].curve.cpr)
    assert -1 <= c.spearman["projection"]["attribution"] <= 1


def test_projection_and_magnitude_share_one_cdt_pass(tiny_qwen, indonesian, monkeypatch):
    """Both CD-T scorings come from one propagation, with the tables each would get alone."""
    from ctsft_lens import head_relevance
    from ctsft_lens.cdt import relevance
    from ctsft_lens.compare import compare_methods

    calls = []
    real = relevance.propagate
    monkeypatch.setattr(relevance, "propagate", lambda *a, **k: calls.append(1) or real(*a, **k))
    discovery, evaluation = indonesian.sample(3, seed=0), indonesian.sample(6, "valid", seed=1)
    c = compare_methods(tiny_qwen, discovery, evaluation, ["attribution", "projection", "magnitude"], sizes=[1, 4],
                        seeds=(), n_boot=20, progress=False)
    shared, calls[:] = len(calls), []
    assert list(c.methods) == ["attribution", "projection", "magnitude"]  # the order given, not the pass's
    assert c.methods["attribution"].cpr_diff is None and c.methods["magnitude"].cpr_diff is not None
    ordered = [ex for uid in c.meta["discovery_uids"] for ex in discovery if ex.uid == uid]
    for name in ("projection", "magnitude"):
        alone = head_relevance(tiny_qwen, ordered, scoring=name, progress=False).per_example[0]
        torch.testing.assert_close(c.methods[name].per_example, alone)
    assert shared > 0 and len(calls) == 2 * shared  # alone, each scoring costs the whole shared pass
    assert c.meta["shared_cdt_pass"] == ["projection", "magnitude"]
    assert c.methods["projection"].seconds == pytest.approx(c.methods["magnitude"].seconds)
    assert "one shared CD-T pass" in c.summary()
    # saved tables re-judged later (benchmarks/real_weights/recurve.py) give compare's own figures
    from ctsft_lens.batching import by_length
    from ctsft_lens.compare import judge_tables
    from ctsft_lens.faithfulness import MeanAblation

    ab = MeanAblation(tiny_qwen, by_length(tiny_qwen, evaluation), progress=False)
    again = judge_tables(ab, {m: r.scores for m, r in c.methods.items()}, [1, 4], n_boot=20)
    for name, r in c.methods.items():
        assert again[name].curve.cpr == pytest.approx(r.curve.cpr) and again[name].cpr_ci == pytest.approx(r.cpr_ci)


def test_a_cdt_method_may_name_its_rule_set(tiny_qwen, indonesian):
    """``projection`` (the default rules) beside ``projection@cdt-paper``: each table is what that rule
    set gives alone, the two differ, and only same-rules CD-T scorings share a pass."""
    from ctsft_lens import head_relevance
    from ctsft_lens.compare import compare_methods, method_spec
    from ctsft_lens.scoring import DiscoveryConfig
    from ctsft_lens.errors import CtsftError

    discovery, evaluation = indonesian.sample(3, seed=0), indonesian.sample(6, "valid", seed=1)
    c = compare_methods(tiny_qwen, discovery, evaluation, ["projection", "projection@cdt-paper", "magnitude"],
                        sizes=[1, 4], seeds=(), n_boot=20, progress=False)
    ordered = [ex for uid in c.meta["discovery_uids"] for ex in discovery if ex.uid == uid]
    for name, rules in (("projection", None), ("projection@cdt-paper", "cdt-paper")):
        alone = head_relevance(tiny_qwen, ordered, scoring="projection", decomposition=rules,
                               progress=False).per_example[0]
        torch.testing.assert_close(c.methods[name].per_example, alone)
    assert not torch.allclose(c.methods["projection"].scores, c.methods["projection@cdt-paper"].scores)
    assert c.meta["shared_cdt_pass"] == ["projection", "magnitude"]
    assert c.meta["rules"] == {"projection": "exact", "projection@cdt-paper": "cdt-paper", "magnitude": "exact"}
    with pytest.raises(CtsftError, match="only a CD-T scoring"):
        method_spec("attribution@faithful", DiscoveryConfig())
    with pytest.raises(CtsftError, match="unknown CD-T rule set"):
        method_spec("projection@nope", DiscoveryConfig())


def test_compare_resumes_from_its_cache(tiny_qwen, indonesian, tmp_path, monkeypatch):
    """A second run with the same discovery reads every pass from the cache (no scoring runs) and
    gives the same tables and seconds; a new method computes only its own pass."""
    from ctsft_lens import compare as compare_module
    from ctsft_lens.compare import compare_methods

    calls: list[tuple[str, ...]] = []
    real = compare_module.relevances
    monkeypatch.setattr(compare_module, "relevances",
                        lambda *a, scorings, **k: calls.append(tuple(scorings)) or real(*a, scorings=scorings, **k))
    discovery, evaluation = indonesian.sample(3, seed=0), indonesian.sample(6, "valid", seed=1)
    run = dict(sizes=[1, 4], seeds=(), n_boot=20, progress=False, cache_dir=tmp_path / "cache")
    first = compare_methods(tiny_qwen, discovery, evaluation, ["attribution", "projection"], **run)
    assert calls == [("attribution",), ("projection",)]
    calls.clear()
    again = compare_methods(tiny_qwen, discovery, evaluation, ["attribution", "projection", "magnitude@cdt-paper"], **run)
    assert calls == [("magnitude",)]  # another rule set: its own pass; the rest from the cache
    for name in ("attribution", "projection"):
        assert torch.equal(again.methods[name].per_example, first.methods[name].per_example)
        assert again.methods[name].seconds == first.methods[name].seconds
    calls.clear()
    compare_methods(tiny_qwen, indonesian.sample(3, seed=1), evaluation, ["attribution"], **run)
    assert calls == [("attribution",)]  # other prompts: recomputed


def test_spearman_with_ties_and_unscored_heads():
    from ctsft_lens.statistics import spearman

    a = torch.tensor([[1.0, 2.0, 2.0, 4.0], [float("nan"), 0.0, 5.0, 6.0]])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    x, y = torch.tensor([1.0, 2.0, 2.0, 4.0]), torch.tensor([4.0, 3.0, 1.0, 2.0])
    rx, ry = torch.tensor([1.0, 2.5, 2.5, 4.0]), torch.tensor([4.0, 3.0, 1.0, 2.0])  # average ranks of the tie
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert spearman(x, y) == pytest.approx(float((rx * ry).sum() / (rx.norm() * ry.norm())))


def test_mib_protocol_fractions_area_and_rankings(tiny_qwen, examples):
    from ctsft_lens.faithfulness import MeanAblation
    from ctsft_lens.mib import MIB_FRACTIONS, mib_area, mib_curve, mib_sizes

    assert MIB_FRACTIONS == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert mib_sizes(336) == [0, 0, 1, 3, 6, 16, 33, 67, 168, 336]
    assert mib_area([1.0] * 10) == pytest.approx(0.999)  # no point at 0: the area starts at 0.001
    assert mib_area([0.0] * 9 + [1.0]) == pytest.approx(0.25)  # (1 - 0.5) * (0 + 1) / 2
    ab = MeanAblation(tiny_qwen, examples, progress=False)
    scores = torch.tensor([[-100.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, float("nan")]])  # 1.7 unscored: not ranked, not counted
    curve = mib_curve(ab, scores)
    assert curve.n_scored == 15 and list(curve.sizes) == mib_sizes(15)
    half = curve.sizes[MIB_FRACTIONS.index(0.5)]  # 7 heads
    signed = ab.faithfulness(ab.metrics(ab.table([(1, 6), (1, 5), (1, 4), (1, 3), (1, 2), (1, 1), (1, 0)])))
    absolute = ab.faithfulness(ab.metrics(ab.table([(0, 0), (1, 6), (1, 5), (1, 4), (1, 3), (1, 2), (1, 1)])))
    assert half == 7
    assert curve.signed[8] == pytest.approx(signed) and curve.absolute[8] == pytest.approx(absolute)
    assert curve.signed[0] == 0.0  # int(0.001 * 15) = 0 heads: the empty circuit
    assert curve.cpr == pytest.approx(mib_area(curve.signed))
    assert curve.cmd == pytest.approx(mib_area([abs(1 - v) for v in curve.absolute]))


def test_faithfulness_command_with_the_mib_protocol(tmp_path):
    from ctsft_lens import load_task
    from ctsft_lens import discover
    from ctsft_lens.circuit import save_circuit
    from ctsft_lens.models import load_model

    model = load_model("tiny")
    circuit = discover(model, load_task("nusax-senti", "indonesian").sample(3, seed=0), scoring="attribution",
                       ratio=0.1, max_depth=1, progress=False)
    save_circuit(circuit, tmp_path / "c.json")
    rc = main(["faithfulness", "--model", "tiny", "--circuit", str(tmp_path / "c.json"), "--n-examples", "3",
               "--seeds", "0", "--points", "3", "--protocol", "mib", "--out", str(tmp_path / "f"), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "f" / "faithfulness.json").read_text())
    assert data["mib"]["attribution"]["n_scored"] == 32 and len(data["mib"]["attribution"]["f_signed"]) == 10
    assert "MIB protocol" in (tmp_path / "f" / "faithfulness.txt").read_text()


def test_eap_graph_round_trip_keeps_unscored_heads_unscored(tiny_qwen, examples, tmp_path):
    """A head we did not score is written with no score (not 0.0), so MIB's evaluator, which ranks
    only scored nodes, keeps it out of its ranking; scored heads keep their exact score."""
    from ctsft_lens import discover
    from ctsft_lens.eap_graph import mask_from_eap_graph, node_name, save_eap_graph
    from ctsft_lens.masks import circuit_mask

    circuit = discover(tiny_qwen, examples, scoring="patching", ratio=0.125, max_depth=0, progress=False)
    table = circuit.scores[0].clone()
    unscored = [(0, 1), (1, 6)]
    for h in unscored:
        table[h] = float("nan")
    circuit = dataclasses.replace(circuit, scores=(table,))
    mask = circuit_mask(circuit)
    path = save_eap_graph(mask, tmp_path / "graph.json", circuit)
    data = json.loads(path.read_text())
    for layer in range(2):
        for head in range(8):
            node = data["nodes"][node_name((layer, head))]
            if (layer, head) in unscored:
                assert "score" not in node
            else:
                assert node["score"] == pytest.approx(float(table[layer, head]), rel=1e-6)
                assert not math.isnan(node["score"])
    assert "NaN" not in path.read_text() and "null" not in path.read_text()
    assert set(mask_from_eap_graph(path).heads) == set(mask.heads)


def test_by_length_orders_prompts_and_keeps_every_example(tiny_qwen, indonesian):
    from ctsft_lens.batching import by_length

    examples = indonesian.sample(12, seed=3)
    ordered = by_length(tiny_qwen, examples)
    n = [len(tiny_qwen.tokenizer.encode(ex.prompt, add_special_tokens=False)) for ex in ordered]
    assert n == sorted(n) and sorted(ex.uid for ex in ordered) == sorted(ex.uid for ex in examples)


def test_split_half_stability_is_one_for_a_fixed_ranking_and_near_chance_for_noise():
    from ctsft_lens.statistics import split_half_stability

    labels = [0, 1, 2] * 8
    fixed = torch.arange(400, dtype=torch.float32).view(1, 20, 20).repeat(24, 1, 1) + 0.01 * torch.randn(24, 20, 20)
    s = split_half_stability(fixed, labels, [10, 40], splits=5)
    assert s["n_half"] == 12 and s["overlap"]["10"]["min"] == 1.0 and s["spearman"]["min"] > 0.99
    noise = torch.randn(24, 20, 20, generator=torch.Generator().manual_seed(0))
    s = split_half_stability(noise, labels, [40], splits=20)
    assert s["overlap"]["40"]["chance"] == pytest.approx(0.1) and s["overlap"]["40"]["mean"] < 0.25
    assert abs(s["spearman"]["mean"]) < 0.2
    with pytest.raises(Exception, match="two examples"):
        split_half_stability(noise[:3], [0, 1, 2], [5])


def test_a_scoring_asked_for_twice_is_one_line_wherever_it_is_asked():
    """compare's methods and discovery's scorings share one check (``options.check_distinct``)."""
    from ctsft_lens.compare import compare_methods
    from ctsft_lens.discovery import discover_circuits
    from ctsft_lens.errors import CtsftError

    with pytest.raises(CtsftError, match="methods must be distinct: attribution given twice"):
        compare_methods(None, [], [], ["attribution", "patching", "attribution"])
    with pytest.raises(CtsftError, match="methods: give at least one"):
        compare_methods(None, [], [], [])
    with pytest.raises(CtsftError, match="scorings must be distinct: patching given twice"):
        discover_circuits(None, [], scorings=("patching", "patching"))
