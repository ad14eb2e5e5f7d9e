"""Pure saga logic: migrations declared as data, advanced without I/O."""
