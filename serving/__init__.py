"""The serving side: host-side scheduler and allocators, the engine, the gRPC server.

Empty until the serving issues land; `jlora.generate` is the offline batch path meanwhile.
"""
