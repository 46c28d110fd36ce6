"""The router: rules over finished studies, a durable job queue in the index, the Dask executor,
and the intake of results (stored through the archive, forwarded to PACS)."""
