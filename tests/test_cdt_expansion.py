"""Backward expansion: how many heads per depth, upstream-only, no duplicates, consistent edges."""

from __future__ import annotations

import json

import pytest
import torch

from ctsft_lens import discover, head_relevance
from ctsft_lens.scoring.expansion import n_to_keep


@pytest.fixture(scope="module")
def model():
    from ctsft_lens.models import tiny_model

    return tiny_model("qwen2", n_layers=4, n_heads=4, n_kv_heads=2, seed=11)


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.sample(3, seed=3)


def test_keep_count_rule():
    assert n_to_keep(0.02, 16) == 1  # at least one
    assert n_to_keep(0.02, 336) == 6  # Qwen2.5-0.5B: 24 x 14 heads
    assert n_to_keep(0.25, 16) == 4
    assert n_to_keep(1.0, 16) == 16


def _check_circuit(circuit, model, k):
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    flat = [h for depth in circuit.heads_by_depth for h in depth]
    assert len(flat) == len(set(flat)), "a head was added twice"
    assert len(circuit.scores) == len(circuit.heads_by_depth)
    assert len(circuit.edges) == len(flat)
    for depth, heads in enumerate(circuit.heads_by_depth):
        assert 1 <= len(heads) <= k
        table = circuit.scores[depth]
        assert table.shape == (n_layers, n_heads)
        for e in [e for e in circuit.edges if e.depth == depth]:
            assert e.source in heads
            assert e.score == pytest.approx(float(table[e.source]))
            if depth == 0:
                assert e.target is None
            else:
                assert e.target in circuit.heads_by_depth[depth - 1]
                assert e.source[0] < e.target[0], "a head must be upstream of its target"
        # the kept heads are the best not kept before (ties aside)
        before = {h for d in circuit.heads_by_depth[:depth] for h in d}
        rest = [float(table[layer, head]) for layer in range(n_layers) for head in range(n_heads)
                if (layer, head) not in before and (layer, head) not in heads and not table[layer, head].isnan()]
        if rest and len(heads) == k:
            assert min(float(table[h]) for h in heads) >= max(rest)
    if len(circuit.heads_by_depth) > 1:
        top = max(h[0] for h in circuit.heads_by_depth[0])
        assert circuit.scores[1][top:].isnan().all()  # nothing at or above the targets' layer


@pytest.mark.parametrize("scoring", ["projection", "magnitude"])
def test_discover_builds_a_consistent_circuit(model, examples, scoring):
    ratio = 0.15  # 16 heads -> 2 per depth
    circuit = discover(model, examples, scoring=scoring, ratio=ratio, max_depth=2, progress=False)
    k = n_to_keep(ratio, 16)
    assert k == 2
    _check_circuit(circuit, model, k)
    assert circuit.scoring == scoring and circuit.ratio == ratio
    assert circuit.model["n_layers"] == 4 and "weights_sha256" in circuit.model
    assert circuit.options["baseline"] == "mean" and circuit.options["attention"] == "difference"  # the default rule set's
    assert circuit.options["n_examples"] == 3
    # depth 0 is the logits table of head_relevance with the same options
    rel = head_relevance(model, examples, scoring=scoring, progress=False)
    torch.testing.assert_close(circuit.scores[0], rel.mean[0])


def test_tiny_ratio_keeps_one_head_per_depth(model, examples):
    circuit = discover(model, examples, ratio=1e-6, max_depth=3, baseline="zero",
                       decomposition="exact,attention=frozen", progress=False)
    assert all(len(heads) == 1 for heads in circuit.heads_by_depth)
    _check_circuit(circuit, model, 1)
    layers = [heads[0][0] for heads in circuit.heads_by_depth]
    assert layers == sorted(layers, reverse=True) and len(set(layers)) == len(layers)
    assert circuit.options["attention"] == "frozen" and circuit.options["baseline"] == "zero"


def test_expansion_stops_when_nothing_is_upstream(examples):
    """A one-layer model has no head upstream of any head: only depth 0 remains."""
    from ctsft_lens.models import tiny_model

    one = tiny_model("gpt2", n_layers=1, n_heads=4, d_model=32, seed=0)
    circuit = discover(one, examples, ratio=0.5, max_depth=2, progress=False)
    assert circuit.depth == 0 and len(circuit.heads_by_depth[0]) == 2


def test_bad_arguments(model, examples):
    with pytest.raises(ValueError, match="ratio"):
        discover(model, examples, ratio=0, progress=False)
    with pytest.raises(ValueError, match="max_depth"):
        discover(model, examples, max_depth=-1, progress=False)
    with pytest.raises(ValueError, match="attention rule must be one of"):
        discover(model, examples, decomposition="exact,attention=softmax", progress=False)
    with pytest.raises(ValueError, match="write decomposition='exact,attention=frozen'"):
        discover(model, examples, attention="frozen", progress=False)


def test_cli_discover_writes_a_circuit(tmp_path, capsys):
    from ctsft_lens.circuit import load_circuit
    from ctsft_lens.cli import main

    out = tmp_path / "c.json"
    rc = main(["discover", "--model", "tiny", "--task", "nusax-senti", "--lang", "indonesian",
               "--scoring", "magnitude", "--max-depth", "1", "--ratio", "0.05", "--n-examples", "3",
               "--seed", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    circuit = load_circuit(out)
    assert circuit.scoring == "magnitude" and circuit.options["n_examples"] == 3
    assert json.loads(out.read_text())["ratio"] == 0.05
    assert "depth 0" in capsys.readouterr().out
    rc = main(["discover", "--model", "tiny", "--n-examples", "4", "--out", str(out), "--no-progress"])
    assert rc == 2 and "divisible" in capsys.readouterr().err


def test_cli_discover_several_scorings_from_one_pass(tmp_path, capsys):
    from ctsft_lens.circuit import load_circuit
    from ctsft_lens.cli import main

    base = ["discover", "--model", "tiny", "--max-depth", "1", "--ratio", "0.05", "--n-examples", "3", "--no-progress"]
    assert main(base + ["--scoring", "projection", "--scoring", "magnitude", "--out", str(tmp_path / "both")]) == 0
    both = {n: load_circuit(tmp_path / "both" / f"circuit_{n}.json") for n in ("projection", "magnitude")}
    assert (tmp_path / "both" / "circuit_magnitude.txt").exists()
    assert main(base + ["--scoring", "magnitude", "--out", str(tmp_path / "m.json")]) == 0
    alone = load_circuit(tmp_path / "m.json")
    assert both["magnitude"].heads_by_depth == alone.heads_by_depth and both["projection"].scoring == "projection"
    capsys.readouterr()
    for bad, why in ((["--scoring", "projection", "--scoring", "magnitude", "--out", str(tmp_path / "x.json")],
                      "give a folder"), (["--scoring", "magnitude", "--scoring", "magnitude"], "given twice")):
        assert main(base + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0]
    assert not (tmp_path / "x.json").exists()


def test_cli_discover_source_positions_and_streams(tmp_path, capsys):
    """``--source-positions -1`` and ``--streams both`` reach the circuit file; a bad position is one line."""
    from ctsft_lens.circuit import load_circuit
    from ctsft_lens.cli import main

    out = tmp_path / "c.json"
    base = ["discover", "--model", "tiny", "--max-depth", "0", "--n-examples", "3", "--out", str(out), "--no-progress"]
    assert main(base + ["--source-positions", "-1", "--streams", "both"]) == 0
    options = load_circuit(out).options
    assert options["source_positions"] == [-1] and options["streams"] == "both"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--source-positions", "last"])
    assert exit_.value.code == 2 and "expected positions like -1" in capsys.readouterr().err
    assert main(base + ["--source-positions", "-100000"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside a prompt" in err[0]


@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_depth_tables_aggregate_the_targets_scores(model, examples, aggregate):
    """Depth >= 1 tables are the sum (public CD-T notebooks) or the max over that depth's targets."""
    c = discover(model, examples, ratio=0.25, max_depth=1, aggregate=aggregate, progress=False)
    assert len(c.heads_by_depth) == 2 and c.options["aggregate"] == aggregate
    targets = [h for h in c.heads_by_depth[0] if h[0] > 0]
    rel = head_relevance(model, examples, target=targets, progress=False).mean  # [T, L, H]
    want = rel.nansum(0) if aggregate == "sum" else rel.nan_to_num(float("-inf")).max(0).values
    scored = ~rel.isnan().all(0)
    torch.testing.assert_close(c.scores[1][scored], want[scored], rtol=1e-5, atol=1e-6)
    assert c.scores[1][~scored].isnan().all()


def test_means_over_correct_examples_only(model, indonesian, monkeypatch):
    import importlib

    ev = importlib.import_module("ctsft_lens.evaluate")
    from ctsft_lens.means import correct_examples

    pool = indonesian.sample(30, seed=5)
    wrong = {ex.uid for ex in pool[::2]}  # the "model" answers every other example wrongly

    def predict(model, examples, batch_size=16):
        return torch.stack([torch.nn.functional.one_hot(torch.tensor((ex.label + (ex.uid in wrong)) % 3), 3).float()
                            for ex in examples])

    monkeypatch.setattr(ev, "predict", predict)
    picked = correct_examples(model, pool, 6)
    assert len(picked) == 6 and not {ex.uid for ex in picked} & wrong
    assert sorted(ex.label for ex in picked) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(Exception, match="correctly answered"):
        correct_examples(model, pool, 30)


@pytest.mark.parametrize("target", ["logits", [(2, 1), (3, 0)]])
def test_several_cdt_scorings_from_one_pass_equal_separate_runs(model, examples, target, monkeypatch):
    from ctsft_lens.cdt import relevance
    from ctsft_lens.cdt.relevance import head_relevances

    calls = []
    real = relevance.propagate
    monkeypatch.setattr(relevance, "propagate", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = head_relevances(model, examples, scorings=("projection", "magnitude"), target=target, progress=False)
    shared_calls, calls[:] = len(calls), []
    for name in ("projection", "magnitude"):
        alone = head_relevance(model, examples, scoring=name, target=target, progress=False)
        assert both[name].scoring == name and both[name].targets == alone.targets
        torch.testing.assert_close(both[name].per_example, alone.per_example, rtol=0, atol=0, equal_nan=True)
        assert len(calls) == shared_calls  # each scoring alone costs what both together cost
        calls[:] = []


def test_head_relevances_refuses_what_cannot_share_a_pass(model, examples):
    from ctsft_lens.cdt.relevance import head_relevances

    with pytest.raises(ValueError, match="not a CD-T scoring"):
        head_relevances(model, examples, scorings=("projection", "attribution"), progress=False)
    with pytest.raises(ValueError, match="distinct"):
        head_relevances(model, examples, scorings=("projection", "projection"), progress=False)


def _depth_by_depth(model, examples, scoring, ratio, max_depth, aggregate):
    """The expansion as the public CD-T code runs it: one propagation per depth, targets = last depth's heads."""
    from ctsft_lens.circuit import rank_heads

    k = n_to_keep(ratio, model.cfg.n_layers * model.cfg.n_heads)
    kept, heads, tables = set(), [], []
    for depth in range(max_depth + 1):
        if depth == 0:
            table = head_relevance(model, examples, scoring=scoring, progress=False).mean[0]
        else:
            targets = [h for h in heads[-1] if h[0] > 0]
            if not targets:
                break
            per = head_relevance(model, examples, scoring=scoring, target=targets, progress=False).mean
            table = per.nansum(0) if aggregate == "sum" else per.nan_to_num(float("-inf")).max(0).values
            table[per.isnan().all(0)] = float("nan")
        new = rank_heads(table, exclude=kept)[:k]
        if not new:
            break
        kept.update(new)
        heads.append(tuple(new))
        tables.append(table)
    return heads, tables


@pytest.mark.parametrize("scoring,aggregate", [("projection", "sum"), ("magnitude", "max")])
def test_one_pass_expansion_equals_a_pass_per_depth(model, examples, scoring, aggregate):
    """All depths read from one propagation (target='all') give the depth-by-depth circuit."""
    c = discover(model, examples, scoring=scoring, ratio=0.15, max_depth=2, aggregate=aggregate, progress=False)
    heads, tables = _depth_by_depth(model, examples, scoring, 0.15, 2, aggregate)
    assert c.heads_by_depth == tuple(heads) and len(heads) >= 2
    for mine, ref in zip(c.scores, tables):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_discover_circuits_share_one_pass(model, examples, monkeypatch):
    from ctsft_lens.cdt import relevance
    from ctsft_lens.discovery import discover_circuits

    calls = []
    real = relevance.propagate
    monkeypatch.setattr(relevance, "propagate", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = discover_circuits(model, examples, scorings=("projection", "magnitude"), ratio=0.15, progress=False)
    n_both, calls[:] = len(calls), []
    for name in ("projection", "magnitude"):
        alone = discover(model, examples, scoring=name, ratio=0.15, progress=False)
        assert len(calls) == n_both, "a scoring alone costs what both together cost, all depths included"
        calls[:] = []
        assert both[name].heads_by_depth == alone.heads_by_depth and both[name].scoring == name
        for a, b in zip(both[name].scores, alone.scores):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # the pass of depth 0 alone: no more propagations for depths 1-2
    head_relevance(model, examples, scoring="projection", progress=False)
    assert len(calls) == n_both


def test_one_saved_pass_expands_at_any_ratio(model, examples):
    from ctsft_lens.cdt import head_relevances
    from ctsft_lens.scoring import circuit_from_relevance

    rel = head_relevances(model, examples, scorings=("projection",), target="all", progress=False)["projection"]
    assert rel.targets[0] is None and len(rel.targets) == 1 + 3 * 4  # the logits, then layers 1-3
    for ratio in (0.1, 0.3):
        again = circuit_from_relevance(model, rel, ratio=ratio, max_depth=2)
        assert again.heads_by_depth == discover(model, examples, ratio=ratio, progress=False).heads_by_depth
    with pytest.raises(ValueError, match="ratio"):
        circuit_from_relevance(model, rel, ratio=2.0)


def test_expand_needs_every_head_as_a_target(model, examples):
    from ctsft_lens.scoring.expansion import expand

    rel = head_relevance(model, examples, progress=False)  # logits only
    with pytest.raises(ValueError, match="target='all'"):
        expand(rel, 2, 1)
    with pytest.raises(ValueError, match="discover_circuits|distinct"):
        from ctsft_lens.discovery import discover_circuits

        discover_circuits(model, examples, scorings=("projection", "projection"), progress=False)


def test_expansion_adds_only_positive_heads_and_fewer_when_fewer_exist():
    """Issue #41: a quota never pulls in a head that works against its target (select='positive');
    select='absolute' ranks by |score| and takes them."""
    from ctsft_lens.scoring.expansion import expand
    from ctsft_lens.cdt.relevance import Relevance

    nan = float("nan")
    logits = [[0.05, 0.01], [0.02, -0.3], [0.9, 0.5]]
    # rows: what each source contributes to target head (2,0), (2,1), (1,0), (1,1); NaN: not upstream
    to_20 = [[-0.3, -0.05], [0.2, -0.1], [nan, nan]]
    to_21 = [[-0.2, -0.05], [0.1, -0.1], [nan, nan]]
    to_10 = [[-0.4, -0.1], [nan, nan], [nan, nan]]
    to_11 = [[-0.1, 0.0], [nan, nan], [nan, nan]]
    tables = torch.tensor([logits, to_20, to_21, to_10, to_11])[:, None]  # [T, 1 example, L, H]
    rel = Relevance((None, (2, 0), (2, 1), (1, 0), (1, 1)), tables, "projection")
    heads, scores, edges = expand(rel, 2, 2)
    assert heads == (((2, 0), (2, 1)), ((1, 0),))  # depth 1: one positive head; depth 2: none, the search ends
    assert all(e.score > 0 for e in edges)
    heads_abs, _, _ = expand(rel, 2, 2, select="absolute")
    assert heads_abs[1] == ((0, 0), (1, 0)) and heads_abs[2] == ((0, 1),)  # |-0.5|, 0.3; then |-0.1| beats 0 (0.1 > 0)
