"""Datasets: catalog, import, fetch, synthetic data, manifest, splits, torch Dataset."""
