"""Version 2 of Ferry's migration record and step command.

v2 replaced v1's untyped `facts` bag: a step command names only what to run (migration id,
step, kind, attempt, host, role) and every worker reads the rest from the record, where the
request's options and each step's typed result live. Records written by v1 are upcast on
read (`schemas.v2.migrations.read_record`); every other message is still v1.
"""
