"""Drift monitoring: the training frames' profile a model file carries (profile), the
comparison of new frames with it (drift), the page that shows it (report)."""
