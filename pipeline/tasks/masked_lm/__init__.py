"""Masked language modelling: the task, corpora, masking, scoring, the sparse head."""
