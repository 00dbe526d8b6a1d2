"""Explainer integrations: adapters that run explainers' work on the engine."""
