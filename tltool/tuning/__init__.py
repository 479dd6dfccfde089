"""Search layer of `tune`: Keras Tuner over the recipe's space, the distributed roles, the reports."""
