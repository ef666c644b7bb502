"""Dossier domain rules: status machine and request validation."""
