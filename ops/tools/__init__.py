"""Tools for developers and operators, run rather than imported: the benchmark
(``python -m ops.tools.bench``) and the torture test (``python -m ops.tools.torture``).

Nothing in pipeline/, workers/, tasks/ or the rest of ops/ imports them, and they use
indexq's public functions only.
"""
