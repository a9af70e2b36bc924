"""Project tooling that is not part of the inferd package (the dependency locks)."""
