"""Circuit and head-mask files, the paper's control masks, and the EAP-IG / MIB graph export."""

import json
from pathlib import Path

import pytest
import torch

from ctsft_lens.circuit import Circuit, Edge, load_circuit, parse_head, rank_heads, save_circuit
from ctsft_lens.eap_graph import mask_from_eap_graph, save_eap_graph, to_eap_graph
from ctsft_lens.errors import MaskError
from ctsft_lens.masks import (
    VARIANTS, HeadMask, all_mask, circuit_mask, load_mask, nearzero_mask, none_mask, random_mask, save_mask,
    variant_mask,
)
from ctsft_lens.models import model_info, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", n_layers=2, n_heads=8, n_kv_heads=2)


def make_circuit(info: dict, seed: int = 0) -> Circuit:
    """A hand-built two-step circuit over a [n_layers, n_heads] model with random score tables."""
    gen = torch.Generator().manual_seed(seed)
    shape = (info["n_layers"], info["n_heads"])
    s0 = torch.randn(shape, generator=gen)
    s1 = torch.randn(shape, generator=gen)
    s1[1:] = float("nan")  # depth-1 candidates: only heads upstream of layer 1
    top = [divmod(int(i), shape[1]) for i in s0.abs().flatten().argsort(descending=True)[:2]]
    d1 = [(0, h) for h in range(shape[1]) if (0, h) not in top][:1]
    edges = [Edge(h, None, 0, float(s0[h])) for h in top] + [Edge(d1[0], top[0], 1, float(s1[d1[0]]))]
    return Circuit((tuple(top), tuple(d1)), (s0, s1), tuple(edges), "projection", 0.1, info,
                   {"positions": "pooled"})


def test_circuit_round_trips_through_its_file(tmp_path, model):
    c = make_circuit(model_info(model))
    back = load_circuit(save_circuit(c, tmp_path / "c.json"))
    assert back.heads_by_depth == c.heads_by_depth and back.edges == c.edges
    assert (back.scoring, back.ratio, back.model, back.options) == (c.scoring, c.ratio, c.model, c.options)
    for a, b in zip(back.scores, c.scores):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # float32 -> JSON -> float32 is exact
    assert json.loads((tmp_path / "c.json").read_text())["scores"][1][1][0] is None  # NaN as null


def test_wrong_files_are_refused_clearly(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(MaskError, match="not a circuit file"):
        load_circuit(tmp_path / "x.json")
    with pytest.raises(MaskError, match="not a head mask file"):
        load_mask(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(MaskError, match="not valid JSON"):
        load_mask(tmp_path / "bad.json")
    with pytest.raises(MaskError, match="does not exist"):
        load_mask(tmp_path / "missing.json")
    (tmp_path / "h.json").write_text('["1.2", "one.two"]')
    with pytest.raises(MaskError, match="cannot read head 'one.two'"):
        load_mask(tmp_path / "h.json")


def test_head_names_parse_in_every_spelling():
    assert parse_head("3.7") == parse_head("a3.h7") == parse_head([3, 7]) == (3, 7)


def test_mask_round_trips_through_its_file(tmp_path, model):
    c = make_circuit(model_info(model))
    mask = circuit_mask(c)
    back = load_mask(save_mask(mask, tmp_path / "mask.json"))
    assert back == mask
    assert back.heads == tuple(sorted(c.heads)) and back.kind == "circuit"
    assert back.meta["depth"] == 1 and back.meta["scoring"] == "projection"
    assert back.meta["heads_by_depth"] == [[f"{l}.{h}" for l, h in d] for d in c.heads_by_depth]
    assert len(back.meta["scores"]) == 2  # the full score table of every depth
    assert circuit_mask(c, depth=0).heads == tuple(sorted(c.heads_by_depth[0]))
    loaded = load_mask(tmp_path / "mask.json", model)  # checked against the model it is applied to
    assert loaded.heads == mask.heads


def test_mask_from_another_model_shape_is_refused(tmp_path, model):
    info = model_info(model)
    other = {**info, "name": "Qwen/Qwen2.5-0.5B", "n_layers": 24, "n_heads": 14, "d_model": 896}
    save_mask(HeadMask(((20, 3),), other), tmp_path / "other.json")
    with pytest.raises(MaskError, match=r"made for model 'Qwen/Qwen2.5-0.5B'.*n_layers: mask 24 vs model 2"):
        load_mask(tmp_path / "other.json", model)
    gpt = {**info, "architecture": "GPT2LMHeadModel"}
    with pytest.raises(MaskError, match="architecture: mask GPT2LMHeadModel vs model Qwen2ForCausalLM"):
        HeadMask(((0, 1),), gpt).check(model)
    # a hand-written mask has no model info: the heads themselves are checked
    (tmp_path / "hand.json").write_text('["0.1", "5.2"]')
    with pytest.raises(MaskError, match=r"outside this model of 2 layers x 8 heads"):
        load_mask(tmp_path / "hand.json", model)


def test_weights_checksum_is_checked_only_when_strict(tmp_path, model):
    info = {**model_info(model), "weights_sha256": "0" * 16}
    save_mask(HeadMask(((0, 1),), info), tmp_path / "m.json")
    load_mask(tmp_path / "m.json", model)
    with pytest.raises(MaskError, match="weights_sha256"):
        load_mask(tmp_path / "m.json", model, strict_weights=True)


def test_hand_written_mask_gets_model_info_when_loaded_for_a_model(tmp_path, model):
    (tmp_path / "hand.json").write_text('["1.7", "0.2", "a0.h3"]')
    bare = load_mask(tmp_path / "hand.json")
    assert bare.heads == ((0, 2), (0, 3), (1, 7)) and bare.kind == "manual" and bare.model == {}
    bound = load_mask(tmp_path / "hand.json", model)
    assert bound.model["n_layers"] == 2 and bound.as_tensor().sum() == 3 and bound.as_tensor()[1, 7]


def test_nearzero_mask_has_the_circuit_size_lowest_scores_and_is_disjoint(model):
    c = make_circuit(model_info(model))
    nz = nearzero_mask(c)
    assert nz.kind == "nearzero" and len(nz.heads) == len(c.heads) == 3
    assert not set(nz.heads) & set(c.heads)
    abs0 = c.scores[0].abs()
    worst_chosen = max(float(abs0[h]) for h in nz.heads)
    rest = [float(abs0[l, h]) for l in range(2) for h in range(8) if (l, h) not in set(nz.heads) | set(c.heads)]
    assert all(v >= worst_chosen for v in rest)


def test_random_mask_has_the_size_and_ignores_the_circuit(model):
    info = model_info(model)
    a, b = make_circuit(info, seed=0), make_circuit(info, seed=1)
    assert set(a.heads) != set(b.heads)
    ra = random_mask(info, len(a.heads), seed=3, like=a)
    rb = random_mask(info, len(b.heads), seed=3, like=b)
    assert ra.heads == rb.heads and len(ra.heads) == 3  # depends on shape, n, seed only
    draws = {random_mask(info, 3, seed=s).heads for s in range(20)}
    assert len(draws) > 10
    hits = sum(bool(set(random_mask(info, 8, seed=s).heads) & set(a.heads)) for s in range(50))
    assert hits > 0  # may overlap the circuit, as documented
    with pytest.raises(MaskError):
        random_mask(info, 17)


def test_all_and_none_masks(model):
    info = model_info(model)
    assert all_mask(info).as_tensor().all() and len(all_mask(info).heads) == 16
    assert not none_mask(info).as_tensor().any()


def test_eap_graph_has_mib_edge_counts_and_round_trips(tmp_path):
    for (n_layers, n_heads), count in {(12, 12): 32491, (24, 14): 179749}.items():  # MIB's EDGE_COUNTS
        info = {"n_layers": n_layers, "n_heads": n_heads, "d_model": 64}
        assert len(to_eap_graph(all_mask(info))["edges"]) == count
    info = {"n_layers": 3, "n_heads": 4, "d_model": 16}
    c = make_circuit(info)
    mask = circuit_mask(c)
    g = to_eap_graph(mask, c)
    assert {n for n, v in g["nodes"].items() if n.startswith("a") and v["in_graph"]} == \
        {f"a{l}.h{h}" for l, h in mask.heads}
    kept = {n for n, v in g["nodes"].items() if v["in_graph"]}
    for name in g["edges"]:
        parent, child = name.split("->")
        assert parent in kept and child.split("<")[0] in kept
    top = c.heads_by_depth[0][0]
    assert g["edges"][f"a{top[0]}.h{top[1]}->logits"]["score"] == pytest.approx(float(c.scores[0][top]))
    assert g["nodes"][f"a{top[0]}.h{top[1]}"]["score"] == pytest.approx(float(c.scores[0][top]))
    back = mask_from_eap_graph(save_eap_graph(mask, tmp_path / "g.json", c))
    assert back.heads == mask.heads


FIXTURES = Path(__file__).with_name("fixtures")


def test_rank_heads_is_the_one_ranking_rule():
    s = torch.tensor([[0.1, -2.0], [float("nan"), 1.0], [1.0, 0.5]])
    assert rank_heads(s) == [(1, 1), (2, 0), (2, 1), (0, 0), (0, 1)]  # ties: lower (layer, head) first; NaN left out
    assert rank_heads(s, absolute=True) == [(0, 1), (1, 1), (2, 0), (2, 1), (0, 0)]
    assert rank_heads(s, exclude=[(1, 1), (2, 1)]) == [(2, 0), (0, 0), (0, 1)]


def test_files_written_by_version_0_1_still_load(model):
    """Circuit and mask files from the previous release (tests/fixtures, written by v0.1.0)."""
    c = load_circuit(FIXTURES / "v0.1_circuit.json")
    assert c.heads == [(0, 2), (0, 3), (0, 4), (1, 1)] and c.depth == 1 and c.scoring == "projection"
    mask = load_mask(FIXTURES / "v0.1_mask.json", model)
    assert mask.heads == tuple(c.heads) and mask.kind == "circuit"
    near = load_mask(FIXTURES / "v0.1_nearzero_mask.json", model)
    assert near.heads == nearzero_mask(c).heads  # today's ranking picks the same control


def test_every_variant_in_the_registry_builds_its_mask(model):
    info = model_info(model, checksum=False)
    c = load_circuit(FIXTURES / "v0.1_circuit.json")
    masks = {name: variant_mask(name, info, c, seed=3) for name in VARIANTS}
    assert masks["full"] is None and masks["norm-only"].heads == ()
    assert masks["circuit"].heads == tuple(c.heads)
    assert len(masks["nearzero"].heads) == len(masks["random"].heads) == len(c.heads)
    with pytest.raises(MaskError, match="built from a circuit"):
        variant_mask("circuit", info, None)
    with pytest.raises(MaskError, match="unknown variant"):
        variant_mask("lottery", info, c)


@pytest.mark.parametrize("bad", [[2.7, 1], [True, 1], 2.7, 3])
def test_heads_that_are_not_integers_are_refused(bad):
    with pytest.raises(MaskError, match="cannot read head"):
        parse_head(bad)


def test_eap_graph_gives_unscored_heads_no_score():
    scores = torch.full((2, 8), float("nan"))
    scores[1, 3] = 0.5
    c = Circuit((((1, 3),),), (scores,), (Edge((1, 3), None, 0, 0.5),), "projection", 0.1,
                {"n_layers": 2, "n_heads": 8})
    graph = to_eap_graph(circuit_mask(c), c)
    assert graph["nodes"]["a1.h3"]["score"] == 0.5
    assert "score" not in graph["nodes"]["a0.h0"]  # MIB would rank a 0.0; no score keeps it out
