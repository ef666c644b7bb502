"""Upstream stand-ins, fleet runner and drills (grows with the replication and drill work)."""
