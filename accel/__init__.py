"""trinity.accel — see ARCHITECTURE.md."""
