"""Scoring models: the standard protocol (metrics), evaluation over the test sets with its
reports (evaluate), and the offline DVC plots (plots)."""
