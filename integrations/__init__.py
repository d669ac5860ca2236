"""DeepSpeed and Weights & Biases glue, installed as ``nonlocal_dist.integrations``."""
