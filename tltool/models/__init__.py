"""Model layer: the backbone registry (specs, weights, preprocessing) and backbone + new head."""
