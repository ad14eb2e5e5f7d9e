"""OCI and Docker images brought into Ferry: found in a layout or archive, checked, converted."""
