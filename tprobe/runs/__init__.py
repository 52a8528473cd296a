"""Run folders: the run record every command writes, the random-weights predicate, the report."""
