"""Bundled data (``mnist_subset.npz``) and the tools that write data files."""
