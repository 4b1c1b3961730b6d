"""Concept tests: teacher hook and attribution, SAEs and their training, labelling checks, concept tools."""
