"""agentctl: the thin client of agentd. Importing it never imports mlx."""
