"""Analysis plug-ins and what they share: the plug-in interface, the array backend (CuPy or
NumPy), result builders (highdicom SC and SR), and the runner Dask workers execute."""
