"""The gRPC edge: the guard every call passes (authentication, roles, the error contract,
request limits, tracing) and the public services registered through it (reflection)."""
