"""The services: gateway (HTTP API), scheduler (DAG engine), executor (runs tasks)."""
