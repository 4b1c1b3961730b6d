"""Data tests: tokenizers, preprocessing, indexed and blended datasets, concept-label files, data tools."""
