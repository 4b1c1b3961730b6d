"""Layout-equivalence runs: each parallel layout (TP, PP, VPP, SP, DP, DeepSpeed) against one process."""
