"""`plmtool draft bench`'s measurements: the speed benchmark, per-program step timing, its markdown."""
