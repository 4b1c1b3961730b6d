"""Evaluation of trained models (checkpoints and Hugging Face directories); tools/evaluate.py is the CLI.

lm         held-out language modelling: document split as training cuts it, per-document scoring with sliding
           windows, loss / perplexity / bits per byte, the markdown table
zero_shot  the paper's Table 1 tasks through lm-evaluation-harness on local JSON-lines files (lm-eval's own task
           configs with the data source replaced), checkpoints through their export, the Table 1 markdown
"""
