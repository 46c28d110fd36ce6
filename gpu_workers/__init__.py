"""Analysis plug-ins and what they share: the plug-in interface, the array backend (CuPy or
NumPy), result builders (highdicom SC and SR). The Dask task that runs a job is the router's
(router/task.py)."""
