"""Energy sharing: the allocation engine (pure) and, around it, settings, worker and queries."""
