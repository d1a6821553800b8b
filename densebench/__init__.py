"""densebench: the DenseCL results table, reproduced end to end, for any self-supervised ResNet."""

__version__ = "0.1.0"
