"""Florist: server/flwr_app."""
