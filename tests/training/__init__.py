"""Training tests: checkpointing, DeepSpeed back end, FLOPs, logging, setup errors."""
