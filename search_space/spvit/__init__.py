"""SPViT (TPAMI 2024): self-attention pruned into convolutions, in a single path."""
