"""Version 1 of Ferry's messages. A breaking change adds `v2` beside it, never edits these."""
