"""Dossier Docs, records and digests, hybrid logical clock, journal."""
