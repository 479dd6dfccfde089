"""Data layer: reading any image file, class folders and their splits, input pipelines, `data check`."""
