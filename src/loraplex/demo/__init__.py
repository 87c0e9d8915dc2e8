"""``loraplex demo`` and the datasets it builds from text installed on the machine (never imported by the core)."""
