"""Florist: server/api."""
