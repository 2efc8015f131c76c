"""Process-level helpers shared by training and inference (no model code)."""
