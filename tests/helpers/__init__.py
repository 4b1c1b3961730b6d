"""Helpers shared by the tests, imported as `from tests.helpers.<module> import ...`.

paths           the repository root, the shipped example data (corpus, GPT-2 BPE files), examples/*.py as modules
launch          running scripts under torchrun / DeepSpeed / one process on gloo; TINY_GPT; loss comparison
cocomix_assets  the cached tiny random teacher + TopK SAE for TINY_GPT, and the CoCoMix flags that use them
concept_files   tiny random HF teachers, OpenAI-format SAEs and token datasets written to a given path
data_files      writers of small input files (JSON lines)
task_data       zero-shot task files: a few documents per task in the schema lm-eval reads

Worker scripts (run by file path under a launcher, never collected by pytest):
pretrain_worker       one pretrain_cocomix run; writes its summary (launch.run_pretrain)
multi_run_worker      several trainings / label extractions in one launch; writes {name: summary}
concept_ops_worker    the tensor-parallel CoCoMix operation checks of tests/model/test_concept_ops.py
evaluate_worker       several tools/evaluate.py runs in one launch; writes each exit status and each rank's stderr
"""
