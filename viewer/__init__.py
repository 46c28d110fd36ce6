"""The clinician web viewer (aiohttp): log in, find a study, look at images and results in 2D
and 3D, start an analysis, share a link."""
