"""Florist: client."""
