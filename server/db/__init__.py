"""Florist: server/db."""
