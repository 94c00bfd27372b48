"""kvmem: the public client package (gRPC stubs under kvmem.v1, Client in kvmem.client)."""
__version__ = "0.1.0"
