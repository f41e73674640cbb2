"""What this machine has: MLX's device, the BLAS under its CPU matmuls."""
