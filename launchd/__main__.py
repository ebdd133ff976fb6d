"""`python -m agentctl.service ...` runs the service group without the main agentctl CLI."""

from .cli import service

if __name__ == "__main__":
    service(prog_name="agentctl service")
