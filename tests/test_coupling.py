import json

import networkx as nx
import numpy as np
import pytest

from conftest import analysed

NAMES = ["vit", "deit_distilled", "eva02", "swin", "bert_minilm", "gpt2", "llama_gqa", "hf_vit"]


@pytest.mark.parametrize("name", NAMES)
def test_components_are_units(name):
    """Connected components of each kind's edges in the networkx graph are exactly the units."""
    cg = analysed(name)[3]
    g = cg.graph
    for kind in ("qk", "v", "head", "mlp"):
        sub = nx.Graph([(a, b) for a, b, d in g.edges(data=True) if d["kind"] == kind])
        units = sum(gr.units for gr in cg.groups if gr.kind == kind)
        singles = sum(1 for gr in cg.groups if gr.kind == kind for u in range(gr.units)
                      if sum(m.index.shape[1] for m in gr.members) == 1)
        assert nx.number_connected_components(sub) + singles == units, kind


@pytest.mark.parametrize("name", NAMES)
def test_groups_are_valid_slices(name):
    m, _, _, cg = analysed(name)
    params = dict(m.named_parameters()) | dict(m.named_buffers())
    for gr in cg.groups:
        seen = {}
        for mb in gr.members:
            size = params[mb.param].shape[mb.dim]
            assert mb.index.min() >= 0 and mb.index.max() < size, (gr.name, mb.param)
            key = (mb.param, mb.dim)
            flat = mb.index.reshape(-1).tolist()
            seen.setdefault(key, []).extend(flat)
        for key, idx in seen.items():          # within a group, no neuron belongs to two units
            assert len(idx) == len(set(idx)), (gr.name, key)
        if gr.heads is not None:               # every kv head has the same number of units
            counts = np.bincount(gr.heads)
            assert (counts == counts[0]).all()


@pytest.mark.parametrize("name", NAMES)
def test_kinds_partition_neurons(name):
    """Units of one kind never share a neuron across groups (qk vs qk, mlp vs mlp...)."""
    cg = analysed(name)[3]
    for kind in ("qk", "v", "mlp", "head"):
        seen = set()
        for gr in cg.groups:
            if gr.kind != kind:
                continue
            for mb in gr.members:
                for i in mb.index.reshape(-1).tolist():
                    key = (mb.param, mb.dim, i)
                    if mb.role == "head_tensor":
                        continue
                    assert key not in seen, key
                    seen.add(key)


def test_exports(tmp_path):
    cg = analysed("vit")[3]
    cg.save(tmp_path / "c.json", "json")
    d = json.loads((tmp_path / "c.json").read_text())
    assert {g["name"] for g in d["groups"]} == {g.name for g in cg.groups}
    cg.save(tmp_path / "c.graphml", "graphml")
    g2 = nx.read_graphml(tmp_path / "c.graphml")
    assert g2.number_of_nodes() == cg.graph.number_of_nodes()
    cg.save(tmp_path / "c.dot", "dot")
    dot = (tmp_path / "c.dot").read_text()
    assert dot.startswith("graph coupling {") and dot.count(" -- ") == cg.graph.number_of_edges()
    with pytest.raises(ValueError):
        cg.save(tmp_path / "c.x", "xml")


def test_summary_mentions_unsupported_reasons():
    cg = analysed("cait")[3]
    text = cg.summary()
    assert "unsupported sites" in text and "talking heads" in text
