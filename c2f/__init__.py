"""c2f: fused part attention and part-wise mixup for coarse-to-fine fine-grained recognition."""
__version__ = "0.1.0"
