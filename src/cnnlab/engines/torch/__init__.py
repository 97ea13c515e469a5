"""The PyTorch engine: network, engine and training backend."""
