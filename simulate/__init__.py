"""trinity.simulate — see docs/architecture.md."""
