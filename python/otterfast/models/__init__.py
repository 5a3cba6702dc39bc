"""Models: OtterHD (Fuyu) now; Otter (OpenFlamingo) next (see README status)."""
