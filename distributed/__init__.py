"""trinity.distributed — see docs/architecture.md."""
