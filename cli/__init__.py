"""trinity.cli — see ARCHITECTURE.md."""
