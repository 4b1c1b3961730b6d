"""Known third-party messages that tell a user of this project's tools nothing, turned off by the entry points.

Each entry point (pretrain_cocomix.py and every tools/*.py) calls `quiet_third_party()` first, before megatron-core
or transformers is imported; the library itself never changes the warning filters, so a program that imports
megatron_cocomix keeps its own settings. Every filter names one message and its category (and, where the
warning is attributed to it, the warning module), so any other warning, a new one included, still shows.

- megatron-core announces on import that Transformer Engine and Apex are absent: this project's CPU path, and an
  optional dependency on GPUs (the fallbacks are the ones it uses).
- megatron-core 0.16's dist_checkpointing loads through torch.distributed.checkpoint's deprecated
  `load_state_dict`, and its torch_dist checkpoints are made of torch's deprecated ShardedTensor: both warn on
  every checkpoint load, about code that is megatron-core's to change.
- Hugging Face's own progress bars ("Loading weights", "Writing model shards") for loads of a few seconds; the
  tools keep their own progress bars (tqdm, off with --no-progress).
"""

from __future__ import annotations

import os
import sys
import warnings

# (message regex, category, module regex or "" for any module)
KNOWN_WARNINGS = (
    (r".*Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core"),
    (r"Apex is not installed", UserWarning, r"megatron\.core"),
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, ""),
)


def quiet_third_party() -> None:
    """Filter KNOWN_WARNINGS and turn Hugging Face's progress bars off (unless the environment sets
    HF_HUB_DISABLE_PROGRESS_BARS itself). For entry points only; call it before importing megatron or transformers."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" in sys.modules:
        # Imported before this call (a program calling a tool's main()): transformers read the variable already.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
