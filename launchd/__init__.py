"""Running agentd as a service: a launchd user agent on macOS, a systemd user unit on Linux."""
