"""The six DVC stages, one module each (`python -m pipeline.stages.<module>`)."""
