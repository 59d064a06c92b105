"""`mediround serve`: the HTTP inference server (FastAPI + uvicorn) over the engine."""
