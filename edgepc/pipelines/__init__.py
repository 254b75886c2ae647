"""Config schema, stage graph with a content-hash cache, and the ``run`` entry point."""
