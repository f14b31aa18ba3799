"""Downstream tasks on an AnnData of raw counts: annotate, embed, integration metrics, in silico and simulated
perturbation.

One AnnData convention, scanpy's: a task that computes per-cell results writes them into the AnnData it is given
and returns ``None``, or with ``copy=True`` writes them into a copy and returns it (the input untouched); an
``.h5ad`` path is read into a new AnnData, which is returned (:func:`hf_scfm.tasks.inference.result_target`). The
keys:

=============================================  ==========================================================
:func:`~hf_scfm.tasks.annotation.annotate`     ``obs["predicted_cell_type"]``, ``obs["predicted_cell_type_confidence"]``,
                                               ``obsm["predicted_cell_type_probabilities"]``,
                                               ``uns["predicted_cell_type_classes"]``, with labels
                                               ``uns["predicted_cell_type_metrics"]``
:func:`~hf_scfm.tasks.embedding.embed`         ``obsm["X_<model_type>"]``, ``uns["X_<model_type>_params"]``, with
                                               gene embeddings ``uns["X_<model_type>_gene_embeddings"]``
:func:`~hf_scfm.tasks.embedding.plot_umap`     ``obsm["<key>_umap"]`` (and the PNG)
=============================================  ==========================================================

Functions that return a table or metrics rather than per-cell fields (``integration_metrics``, which also records
its best clustering in ``obs["<key>_clusters"]``; ``in_silico_perturb``; the logistic-regression baseline) return
them and leave the AnnData's data alone.
"""
