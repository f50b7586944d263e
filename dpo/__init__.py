"""Direct Preference Optimization (arXiv 2305.18290) with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
