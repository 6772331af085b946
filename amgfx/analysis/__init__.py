"""Stage 2, structure: attention sites, MLPs, residual streams and token sites found in the graph,
and the coupling groups (networkx) that say which neurons must go together.
May import: :mod:`amgfx.graph`. Reads the graph only through the op tables; no module classes or names.
"""
