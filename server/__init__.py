"""Florist: server."""
