"""kvmem: the public client package (gRPC stubs under kvmem.v1, Client in kvmem.client)."""
# The one version string: pyproject.toml reads it statically ([tool.setuptools.dynamic]), so keep this
# file free of imports (importing the package must not pull torch or grpc).
__version__ = "0.1.0"
