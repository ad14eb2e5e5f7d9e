"""Adapters for the host: processes, runc, network namespaces, root filesystems.

The only code in Ferry that touches the machine. It knows nothing of NATS.
"""
