"""quotad: quota decisions for LLM calls, served over gRPC, kept in Redis."""

__version__ = "0.1.0"
