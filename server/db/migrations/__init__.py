"""Florist: server/db/migrations."""
