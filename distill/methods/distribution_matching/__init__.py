"""Distribution matching methods (DMD2)."""
