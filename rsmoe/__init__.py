"""rsmoe: train, evaluate and serve RS-MoE (remote-sensing vision-language Mixture of Experts) on DeepSpeed."""

__version__ = "0.1.0"
