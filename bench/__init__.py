"""Benchmarks: each module measures one thing and reports ratios/medians measured in one run."""
