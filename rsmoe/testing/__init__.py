"""Aids for rsmoe's own tests that must live in the package (fault injection points in the trainer)."""
