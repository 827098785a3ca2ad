"""Which coordinates a worker sends, and how that choice moves: the selection primitives in plain
torch and their fused one-pass kernels (C on CPU, Triton on CUDA), the threshold controllers,
the placement of workers over the vector (partitions, bin-packed layers) and the merging of
layers into groups."""
