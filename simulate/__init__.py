"""trinity.simulate — see ARCHITECTURE.md."""
