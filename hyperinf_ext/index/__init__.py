"""A gradient index: fit HyperINF once, store the training gradients compressed, answer many queries.

>>> idx = Index.build(model, train_loader, "idx", config=IndexConfig(proj_dim=1024))
>>> idx = Index.open("idx", model)
>>> top = idx.query(query_loader, top_k=10, exact_rerank=100, train_subset=loader_of_rows)

config.py (IndexConfig), projection.py (seeded per-layer projections of the d side), store.py (shard
files: writer = the fit's gradient sink, memory-mapped reader), index.py (build/open), search.py
(query, scores, mean_scores, self_scores, exact re-ranking).
"""
from .config import IndexConfig
from .index import Index

__all__ = ["Index", "IndexConfig"]
