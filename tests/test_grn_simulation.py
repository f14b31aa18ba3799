"""The GRN simulator (hf_scfm.tasks.grn_simulation): GEARS layout, reproducibility, and that the data obey the
network that made them (knockdown moves direct targets against the edge sign, overexpression with it, genes
outside the perturbed gene's descendants keep their mean)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_scfm.tasks.grn_simulation import descendants, simulate_perturb_seq
from hf_scfm.tasks.perturbation import parse_condition


@pytest.fixture(scope="module")
def sim():
    return simulate_perturb_seq(n_genes=80, n_perturbed_genes=6, n_doubles=5, cells_per_condition=400,
                                n_control_cells=1500, seed=3)


def _means(adata, condition):
    rows = (adata.obs["condition"] == condition).to_numpy()
    return np.asarray(adata.X[rows].mean(0)).ravel(), np.asarray(adata.X[rows].toarray().std(0)).ravel(), rows.sum()


def _gene_index(adata, condition):
    names = list(adata.var["gene_name"])
    return [names.index(g) for g in parse_condition(condition)]


def test_layout_matches_gears_and_the_vocabulary(sim):
    from hf_scfm.tokenization import GeneTokenizer

    assert sim.n_vars == 80
    conditions = list(sim.obs["condition"].cat.categories)
    assert conditions[0] == "ctrl" and (sim.obs["condition"] == "ctrl").sum() == 1500
    singles = [c for c in conditions if c.endswith("+ctrl")]
    doubles = [c for c in conditions if c != "ctrl" and not c.endswith("+ctrl")]
    assert len(singles) == 6 and len(doubles) == 5
    assert all(set(parse_condition(d)) <= {parse_condition(s)[0] for s in singles} for d in doubles)
    assert (sim.obs["n_perturbed"].to_numpy() == [len(parse_condition(c)) for c in sim.obs["condition"]]).all()
    x = sim.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and (x.sum(1) > 0).all()
    report = GeneTokenizer.from_species("human").mapping_report(sim)
    assert report.n_matched == 80  # real Ensembl IDs of the shipped vocabulary
    assert all(str(v).startswith("ENSG") for v in sim.var_names)
    assert sim.var["gene_name"].is_unique and not any(g.startswith("ENS") for g in sim.var["gene_name"])
    grn = sim.uns["grn"]
    w = np.asarray(grn["weights"])
    assert w.shape == (80, 80) and (w != 0).sum() > 40
    order = np.asarray(grn["topological_order"])
    pos = np.empty(80, dtype=int)
    pos[order] = np.arange(80)
    src, dst = np.nonzero(w)
    assert (pos[src] < pos[dst]).all()  # a DAG in that order
    assert set(src) <= set(np.asarray(grn["regulators"]))


def test_seeded_and_writes_to_h5ad(tmp_path, sim):
    import anndata as ad

    again = simulate_perturb_seq(n_genes=80, n_perturbed_genes=6, n_doubles=5, cells_per_condition=400,
                                 n_control_cells=1500, seed=3)
    assert (again.X != sim.X).nnz == 0 and list(again.var_names) == list(sim.var_names)
    other = simulate_perturb_seq(n_genes=80, n_perturbed_genes=6, n_doubles=5, cells_per_condition=400,
                                 n_control_cells=1500, seed=4)
    assert list(other.var_names) != list(sim.var_names)
    sim.write_h5ad(tmp_path / "sim.h5ad")
    back = ad.read_h5ad(tmp_path / "sim.h5ad")
    np.testing.assert_array_equal(back.uns["grn"]["weights"], sim.uns["grn"]["weights"])
    assert list(back.uns["true_expression"]["conditions"]) == list(sim.obs["condition"].cat.categories)


def test_steady_state_is_the_fixed_point(sim):
    grn, truth = sim.uns["grn"], sim.uns["true_expression"]
    w, b, top = (np.asarray(grn[k]) for k in ("weights", "bias", "max_expression"))
    h = np.asarray(truth["values"]) / top
    for c, cond in enumerate(truth["conditions"]):
        free = np.ones(80, dtype=bool)
        free[_gene_index(sim, cond)] = False
        np.testing.assert_allclose(h[c, free], 1 / (1 + np.exp(-(h[c] @ w + b)))[free], rtol=1e-12)
        np.testing.assert_allclose(h[c, ~free], grn["level"] * np.asarray(grn["control_activity"])[~free])


@pytest.mark.parametrize("mode", ["knockdown", "overexpression"])
def test_perturbation_follows_the_edges(sim, mode):
    adata = sim if mode == "knockdown" else simulate_perturb_seq(
        n_genes=80, n_perturbed_genes=6, n_doubles=5, cells_per_condition=400, n_control_cells=1500, seed=3,
        mode=mode)
    w = np.asarray(adata.uns["grn"]["weights"])
    truth = dict(zip(adata.uns["true_expression"]["conditions"], np.asarray(adata.uns["true_expression"]["values"])))
    ctrl_mean, ctrl_sd, n_ctrl = _means(adata, "ctrl")
    sign = -1.0 if mode == "knockdown" else 1.0
    checked_targets = checked_others = 0
    for cond in [c for c in truth if c.endswith("+ctrl")]:
        (g,) = _gene_index(adata, cond)
        desc = descendants(w, g)
        mean, sd, n = _means(adata, cond)
        z = (mean - ctrl_mean) / np.sqrt(sd ** 2 / n + ctrl_sd ** 2 / n_ctrl + 1e-12)
        # the perturbed gene itself
        assert sign * (truth[cond][g] - truth["ctrl"][g]) > 0 and sign * z[g] > 5
        # direct targets with no other path from g: they move with sign(edge) * sign(perturbation)
        for j in np.flatnonzero(w[g]):
            parents = np.flatnonzero(w[:, j])
            if any(p != g and p in desc for p in parents):
                continue
            expected = sign * np.sign(w[g, j])
            assert expected * (truth[cond][j] - truth["ctrl"][j]) > 0
            effect = abs(truth[cond][j] - truth["ctrl"][j]) / max(truth["ctrl"][j], 1e-9)
            if effect > 0.3 and truth["ctrl"][j] > 0.5:  # large enough to see in 400 cells
                assert expected * z[j] > 3, (cond, j, z[j])
                checked_targets += 1
        # everything outside the descendants: the truth is unchanged, the data agree within noise
        others = np.setdiff1d(np.arange(80), np.append(desc, g))
        np.testing.assert_allclose(truth[cond][others], truth["ctrl"][others], rtol=1e-12)
        assert np.mean(np.abs(z[others]) < 3) > 0.97
        checked_others += len(others)
    assert checked_targets >= 3 and checked_others > 100
