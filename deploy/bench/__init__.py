"""`make bench`: Ferry's migrations measured beside a hand-run CRIU baseline and raw TCP."""
