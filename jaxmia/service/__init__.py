"""The recognizer as a service: its policy, dedup index, store, server and client."""
