"""Operations on a data home: backup, integrity checks, recovery, the maintenance tick and
the live status view. The benchmark and the torture test (``ops.tools``) are tools for
developers and operators, not modules the product imports."""
