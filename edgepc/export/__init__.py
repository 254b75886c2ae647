"""Writers of deployable artifacts, one per runtime (the export stage builds on these)."""
