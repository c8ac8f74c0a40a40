"""Fine-tuning methods (flow matching)."""
