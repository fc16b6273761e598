"""ViT-Slim's searchable model: l1-regularised multipliers on a plain timm ViT."""
