"""`soundtag serve`: the tagging service (FastAPI on uvicorn) and its web page."""

from .app import create_app, serve
from .service import Service, Settings

__all__ = ["Service", "Settings", "create_app", "serve"]
