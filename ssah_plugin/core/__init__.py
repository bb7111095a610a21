"""Framework-free core: units, the mask format, policies, planning of frozen slices, the freeze engine."""
