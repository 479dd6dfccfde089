"""Evaluation layer: metrics, sanity probes, plots and the HTML report."""
