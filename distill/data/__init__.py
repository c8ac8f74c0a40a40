"""Data: prompt sets (and, later, the shapes world and latent shards)."""
