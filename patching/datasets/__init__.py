"""Datasets of samples: manifests (JSONL / CSV rows with media paths, question, answer), prompt templates
and answer scoring. Used by the methods that read a dataset and by the study app."""
