"""OFB's searchable model: bi-mask, searchable modules, supernet, PMIM, the subnet fold."""
