"""Retrieval (ActQKV KV-block retrieval, text chunks) and the planner: see issues #4, #5."""
