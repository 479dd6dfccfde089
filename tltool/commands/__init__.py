"""Commands: each reads top to bottom as a list of named steps over the layers below (the public API)."""
