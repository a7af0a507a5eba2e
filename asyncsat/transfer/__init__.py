"""Transfer drivers (one per scheme) and the protocol-independent file handling."""
