"""Tests of the model side: data, training, index, archive, handler, TorchServe."""
