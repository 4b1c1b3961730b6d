"""Evaluation of trained models (checkpoints and Hugging Face directories); tools/evaluate.py is the CLI.

lm   held-out language modelling: document split as training cuts it, per-document scoring with sliding
     windows, loss / perplexity / bits per byte, the markdown table
"""
