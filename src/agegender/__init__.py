"""Reproducible age and gender estimation on IMDB-WIKI."""
