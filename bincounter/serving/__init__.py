"""Serving: the KServe model server (server.py), its client (client.py) and server-free inference (inference.py)."""
