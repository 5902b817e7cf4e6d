"""injector."""
