"""fastmeta: fast meta-learning for PyTorch."""
