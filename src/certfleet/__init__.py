"""certfleet: keep the X.509 identities of device fleets fresh."""

__version__ = "0.1.0"
