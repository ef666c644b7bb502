"""Health probes, circuit breakers and the active-source choice (grows with the failover work)."""
