"""The HTTP layer: parses, calls the core, renders. The core never imports it."""
