"""Prefect flows and deployments, and the flow's SIGKILL watcher (kdas.events alone sends kdas's events from the library)."""
