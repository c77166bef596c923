"""The jlora.v1 gRPC protocol (`jlora/v1/jlora.proto`) and its generated Python stubs."""
