"""The steps each notebook calls, one module per paper (plus the tour)."""
