"""Stage 3, scores: calibration runs the captured graph on data and feeds the collectors each
criterion declares; criteria turn the statistics into per-unit scores (higher = keep).
May import: :mod:`amgfx.graph`, :mod:`amgfx.analysis`.
"""
