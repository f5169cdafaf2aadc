"""Executors: how chunks of source rows run through a method (``local``), and the output folder a
build owns (``output``)."""
