"""trinity.distributed — see ARCHITECTURE.md."""
