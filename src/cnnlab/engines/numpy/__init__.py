"""The from-scratch NumPy engine: ops (forward/backward pairs), engine, optimizers, training backend."""
