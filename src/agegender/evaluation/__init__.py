"""Scoring answers against labels: the metrics, the figures, the report and other labelled face
sets."""
