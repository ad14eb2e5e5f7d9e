"""The fleet controller: one active instance at a time (by its lease) owns the cordons and
answers where containers go; the others stand by to take over."""
