"""Florist: server/db/migrations/versions."""
