"""The serving side: the engine (serving/engine.py) and the host code around it: scheduling and
fairness, KV page allocation, the adapter tiers, request streams and metrics.
"""
