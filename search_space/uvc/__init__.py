"""UVC (ICLR 2022): pruning, block skipping and distillation under a primal-dual budget."""
