"""What operators run and use: the ``tuo`` command line, running and supervising the
components, the one web service composed of the registrars' and citizens' parts,
replay, redelivery, dead letters (read and redrive), consumer lag and per-process
metrics. The only package that may import every other."""
