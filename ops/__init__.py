"""Operations and operator tools: set-up scripts, benchmarks (later: backup, integrity, recovery)."""
