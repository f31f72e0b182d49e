"""Saga coordinator (SPEC section 8)."""
