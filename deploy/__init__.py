"""Ways to run raygan beyond one Python process: a local stack, clusters."""
